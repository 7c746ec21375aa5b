"""Crash safety: a save killed at any moment leaves the old adapter or the new one, never a mix;
every file the harness writes goes through an atomic writer (issue 13, point 6).

The kill test runs in a subprocess that forks one saver per kill and SIGKILLs it after a random
delay spanning the save; the training kill test is in test_train.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.formats.files import write_file, write_folder
from deltatune.formats.io import read_config, read_tensors

KILLS = 20

# Saves adapter B over adapter A (and back) in a forked child, SIGKILLed after a random delay
# spanning a save; after each kill the folder must load as one of the two, config and tensors alike.
KILL_SCRIPT = r"""
import json, os, random, signal, sys, time
import torch
torch.set_num_threads(1)
from torch import nn
import deltatune as dt
from deltatune.formats.io import read_config, read_tensors

folder, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(seed)
LAYERS, WIDTH = 8, 512

def base():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])

versions = []
for v, alpha in enumerate((8.0, 16.0)):  # configs differ too: a mixed folder would show
    model = base()
    dt.inject(model, dt.LoRA(rank=64, alpha=alpha), targets=[str(i) for i in range(LAYERS)])
    torch.manual_seed(100 + v)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.normal_()
    versions.append(model)
states = [{k: t.clone() for k, t in dt.adapter_state(m, "default").items()} for m in versions]
alphas = [8.0, 16.0]

def which():
    config, tensors = read_config(folder), read_tensors(os.path.join(folder, "adapter.safetensors"))
    by_config = alphas.index(config["config"]["alpha"])
    by_tensors = [tensors.keys() == s.keys() and all(torch.equal(tensors[k], s[k]) for k in s)
                  for s in states]
    if not by_tensors[by_config]:
        return None
    dt.load(base(), folder)  # and it loads (strict base)
    return by_config

def save_in_child(v):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, b"s")
        dt.save(versions[v], folder)
        os.write(w, b"d")
        os._exit(0)
    os.close(w)
    return pid, r

def marks(r):
    out = b""
    while chunk := os.read(r, 16):
        out += chunk
    os.close(r)
    return out

dt.save(versions[0], folder)
durations = []
for v in (1, 0, 1, 0):
    t = time.perf_counter()
    pid, r = save_in_child(v)
    os.waitpid(pid, 0)
    marks(r)
    durations.append(time.perf_counter() - t)
span = sorted(durations)[len(durations) // 2]
counts = {"before_save": 0, "mid_save": 0, "after_save": 0, "old": 0, "new": 0, "mixed": 0, "leftovers": 0}
parent = os.path.dirname(os.path.abspath(folder))
name = os.path.basename(os.path.abspath(folder))
current = 0
for _ in range(kills):
    target = 1 - current
    pid, r = save_in_child(target)
    time.sleep(random.uniform(0, span))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    m = marks(r)
    counts["before_save" if m == b"" else "mid_save" if m == b"s" else "after_save"] += 1
    got = which()
    if got is None:
        counts["mixed"] += 1
        continue
    counts["new" if got == target else "old"] += 1
    current = got
    left = [e for e in os.listdir(parent) if e.startswith("." + name + ".")]
    counts["leftovers"] += len(left) > 0
    for e in left:  # hidden siblings a killed save leaves (new not yet swapped in, or old not deleted)
        import shutil
        shutil.rmtree(os.path.join(parent, e), ignore_errors=True)
counts["save_ms"] = round(span * 1000, 1)

# Then deterministically: a child killed right before its n-th rename, exchange or delete.
import shutil
import deltatune.formats.files as dio
counts["injected"] = counts["injected_mixed"] = 0
for n in range(1, 9):
    target = 1 - current
    pid = os.fork()
    if pid == 0:
        calls = [0]
        def dying(fn):
            def wrapped(*args, **kwargs):
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return fn(*args, **kwargs)
            return wrapped
        os.replace, os.rename, shutil.rmtree = dying(os.replace), dying(os.rename), dying(shutil.rmtree)
        if hasattr(dio, "_exchange"):
            dio._exchange = dying(dio._exchange)
        dt.save(versions[target], folder)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    counts["injected"] += os.WIFSIGNALED(status)
    got = which()
    if got is None:
        counts["injected_mixed"] += 1
    else:
        current = got
print(json.dumps(counts))
"""


def test_save_killed_at_random_moments_leaves_the_old_or_the_new_adapter(tmp_path: Path) -> None:
    script = tmp_path / "kill_saves.py"
    script.write_text(KILL_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "adapter"), str(KILLS), "13"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    print(counts)  # e.g. {"before_save": 1, "mid_save": 16, "after_save": 3, "old": 12, "new": 8, ...}
    assert counts["mixed"] == 0 and counts["injected_mixed"] == 0
    assert counts["injected"] >= 2  # killed before the swap and before deleting the old contents
    assert counts["old"] + counts["new"] == KILLS
    assert counts["mid_save"] >= 4, counts  # the kills did land inside saves (about half do)


def test_resaving_swaps_the_whole_folder_and_keeps_other_files_and_modes(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    dt.inject(model, dt.LoRA(rank=2), targets=["0"])
    dt.save(model, folder)
    (folder / "README.md").write_text("mine\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("a\n")
    (folder / "adapter_config.json").chmod(0o600)
    with torch.no_grad():
        dt.trainable_parameters(model)[0].add_(1.0)
    dt.save(model, folder)
    assert (folder / "README.md").read_text() == "mine\n"
    assert (folder / "notes" / "a.txt").read_text() == "a\n"
    assert stat.S_IMODE((folder / "adapter_config.json").stat().st_mode) == 0o600
    saved = read_tensors(folder / "adapter.safetensors")
    assert torch.equal(saved["0.lora_A"], dt.adapter_state(model, "default")["0.lora_A"])
    assert read_config(folder)["targets"] == ["0"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary sibling left


def test_a_failed_write_leaves_the_old_folder_and_file(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    write_folder(folder, lambda tmp: (tmp / "a.txt").write_text("old\n"))

    def failing(tmp: Path) -> None:
        (tmp / "a.txt").write_text("new\n")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder(folder, failing)
    assert (folder / "a.txt").read_text() == "old\n"
    path = tmp_path / "metrics.json"
    write_file(path, lambda p: p.write_text("{}\n"))
    path.chmod(0o640)

    def broken(p: Path) -> None:
        p.write_text("{broken")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_file(path, broken)
    assert path.read_text() == "{}\n"
    write_file(path, lambda p: p.write_text('{"a": 1}\n'))
    assert json.loads(path.read_text()) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # a replaced file keeps its mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "out"]


def test_write_file_keeps_the_suffix_for_writers_that_go_by_it(tmp_path: Path) -> None:
    seen: list[str] = []

    def plot(path: Path) -> None:
        seen.append(path.suffix)
        path.write_bytes(b"png")

    write_file(tmp_path / "curves.png", plot)
    assert seen == [".png"] and (tmp_path / "curves.png").read_bytes() == b"png"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "curves.png").stat().st_mode) == 0o666 & ~mask


def test_the_next_write_deletes_what_a_killed_write_left(tmp_path: Path) -> None:
    """Temporary siblings carry their writer's pid: those of a process that no longer runs go at the
    next write of the same folder or file; a running writer's stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "adapter"
    stale_folder = tmp_path / f".adapter.{dead.pid}.k3j2"
    stale_aside = tmp_path / f".adapter.{dead.pid}.k3j2.old"
    stale_file = tmp_path / f".metrics.{dead.pid}.x81.json"
    live = tmp_path / f".adapter.{os.getppid()}.zz9"  # a running process's write in progress
    other = tmp_path / ".adapter.notapid"  # not ours: left alone
    for p in (stale_folder, stale_aside, live, other):
        p.mkdir()
        (p / "adapter.safetensors").write_bytes(b"partial")
    stale_file.write_text("{")
    write_folder(folder, lambda tmp: (tmp / "a.txt").write_text("a"))
    assert not stale_folder.exists() and not stale_aside.exists()
    assert live.exists() and other.exists() and stale_file.exists()
    write_file(tmp_path / "metrics.json", lambda p: p.write_text("{}"))
    assert not stale_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".adapter.notapid", live.name, "adapter", "metrics.json"]
    )
