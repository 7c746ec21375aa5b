"""Readers see exactly one version of a folder that another process keeps saving (issue 24): a load
returns one complete version, never the config of one and the tensors of another. A writer process
re-saves the folder in a loop, alternating two versions, while this process reads it over and
over: deltatune adapters (same rank, alpha 8 and 16; and ranks 2 and 4), PEFT folders we write,
and training checkpoints. Before, 32 of 200 loads returned a mix, and 17 of 200 failed with a
misleading "mismatched shapes" or "truncated" error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt

LOADS = 1000

# The writer: builds the same toy and its two versions as `versions()` below, then saves them in
# turn until the stop file appears. It counts its saves into the `saves` file.
WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_read_while_saving import save_version, versions
    folder, kind, stop = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    built = versions(kind)
    n = 0
    while not stop.exists():
        save_version(built[n % 2], folder, kind)
        n += 1
        (stop.parent / "saves").write_text(str(n))
    """
)


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def versions(kind: str) -> list[nn.Module]:
    """Two adapted toys whose adapters differ in alpha (``same-rank``) or in rank (``ranks``): the
    tensors of one under the config of the other give an output of neither."""
    out = []
    for i, (rank, alpha) in enumerate([(2, 8), (2, 16)] if kind != "ranks" else [(2, 8), (4, 8)]):
        model = toy()
        dt.inject(model, dt.LoRA(rank=rank, alpha=alpha), targets=["0", "2"], seed=i)
        with torch.no_grad():
            for layer in dt.attachment_of(model).layers("default").values():
                layer.lora_B.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(i))  # type: ignore[operator]
        out.append(model)
    return out


def save_version(model: nn.Module, folder: Path, kind: str) -> None:
    if kind == "peft":
        dt.export_peft(model, folder)
    else:
        dt.save(model, folder)


def load_version(folder: Path, kind: str) -> nn.Module:
    model = toy()
    if kind == "peft":
        dt.import_peft(model, folder)
    else:
        dt.load(model, folder)
    return model


def start_writer(tmp_path: Path, folder: Path, kind: str) -> tuple[subprocess.Popen[bytes], Path]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).parent)))
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, str(script), str(folder), kind, str(stop)])
    deadline = time.monotonic() + 120
    while not (tmp_path / "saves").exists():  # (the writer has saved at least once)
        if writer.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the writer did not start (exit code {writer.poll()})")
        time.sleep(0.05)
    return writer, stop


def stop_writer(writer: subprocess.Popen[bytes], stop: Path) -> int:
    stop.touch()
    assert writer.wait(timeout=60) == 0
    return int((stop.parent / "saves").read_text())


@pytest.mark.parametrize("kind", ["same-rank", "ranks", "peft"])
def test_loads_while_another_process_saves_see_one_version(tmp_path: Path, kind: str) -> None:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    folder = tmp_path / "adapter"
    with torch.no_grad():
        want = [m(x) for m in versions("ranks" if kind == "ranks" else "same-rank")]
    assert not torch.allclose(want[0], want[1])
    writer, stop = start_writer(tmp_path, folder, kind)
    seen = {0: 0, 1: 0}
    mixed, errors = 0, []
    try:
        for _ in range(LOADS):
            try:
                model = load_version(folder, kind)
            except ValueError as e:
                errors.append(str(e))
                continue
            with torch.no_grad():
                out = model(x)
            match = [i for i in (0, 1) if torch.allclose(out, want[i], atol=1e-6)]
            if match:
                seen[match[0]] += 1
            else:
                mixed += 1
    finally:
        saves = stop_writer(writer, stop)
    assert (mixed, errors[:3]) == (0, []), f"{mixed} mixed and {len(errors)} failed of {LOADS} loads"
    # (the reads really overlapped the saves: both versions were read, and the folder was replaced
    # many times while it was being read)
    assert seen[0] > 0 and seen[1] > 0 and saves > 20, (seen, saves)


CHECKPOINT_WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_read_while_saving import checkpoint_parts
    from deltatune.train.checkpoint import save_checkpoint
    folder, stop = Path(sys.argv[1]), Path(sys.argv[3])
    n = 0
    while not stop.exists():
        step = 1 + n % 2
        cfg, params, opt, sched = checkpoint_parts(folder.parent, float(step))
        save_checkpoint(folder, step, cfg, params, ["p"], opt, sched, {{"loss": [float(step)]}})
        n += 1
        (stop.parent / "saves").write_text(str(n))
    """
)


def checkpoint_parts(
    out: Path, value: float
) -> tuple[object, list[nn.Parameter], torch.optim.Optimizer, object]:
    """A run's config, one parameter filled with ``value`` and an AdamW state made from it."""
    from deltatune.train.config import TrainConfig

    cfg = TrainConfig(method="lora", out=str(out))
    params = [nn.Parameter(torch.full((64, 64), value))]
    opt = torch.optim.AdamW(params)
    params[0].grad = torch.full((64, 64), value)
    opt.step()
    with torch.no_grad():
        params[0].fill_(value)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return cfg, params, opt, sched


def test_checkpoint_loads_while_a_run_saves_see_one_checkpoint(tmp_path: Path) -> None:
    """A checkpoint written at step s holds parameters, moments and history of value s: a resume
    that overlaps the next save gets one checkpoint whole."""
    from deltatune.train.checkpoint import load_checkpoint

    folder = tmp_path / "checkpoint"
    script = tmp_path / "writer.py"
    script.write_text(CHECKPOINT_WRITER.format(tests=str(Path(__file__).parent)))
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, str(script), str(folder), "checkpoint", str(stop)])
    deadline = time.monotonic() + 120
    while not (tmp_path / "saves").exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.05)
    mixed, steps = 0, set()
    try:
        for _ in range(LOADS):
            cfg, params, opt, sched = checkpoint_parts(tmp_path, 0.0)
            step, history = load_checkpoint(folder, cfg, params, ["p"], opt, sched)  # type: ignore[arg-type]
            moment = opt.state[params[0]]["exp_avg"]
            values = {float(params[0][0, 0]), history["loss"][0], round(float(moment[0, 0]) / 0.1, 4)}
            steps.add(step)
            mixed += values != {float(step)}
    finally:
        saves = stop_writer(writer, stop)
    assert mixed == 0, f"{mixed} of {LOADS} resumed a mix of two checkpoints"
    assert steps == {1, 2} and saves > 20
