"""Files from elsewhere cannot make deltatune allocate what they do not hold, and where a model came
from never makes a save fail (issue 24).

A saved rank-4 LoRA whose adapter_config.json says ``rank: 5000000`` made ``load`` allocate 7.7 GB
per matrix before reading the tensors; now the sizes the config gives are checked against the
tensor file first, and the field is named. The check runs under an address-space limit, in a
subprocess, so that the old behaviour would fail it with an allocation error rather than pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.formats import io


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(384, 384), nn.ReLU(), nn.Linear(384, 8))


def edit_json(path: Path, **changes: object) -> None:
    config = json.loads(path.read_text())
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(json.dumps(config))


LIMITED = textwrap.dedent(
    """
    import resource, sys
    import torch, deltatune as dt
    from torch import nn
    sys.path.insert(0, {tests!r})
    from test_untrusted_files import toy
    # What the process maps now, plus 1 GiB: a 7.7 GB matrix cannot be allocated under it.
    size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))
    model = toy()
    try:
        getattr(dt, sys.argv[2])(model, sys.argv[1])
    except ValueError as e:
        print("REFUSED", e)
    print("ADAPTED", dt.has_adapters(model))
    """
)


def run_limited(tmp_path: Path, folder: Path, verb: str) -> str:
    script = tmp_path / "limited.py"
    script.write_text(LIMITED.format(tests=str(Path(__file__).parent)))
    done = subprocess.run(
        [sys.executable, str(script), str(folder), verb], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc to set the limit")
@pytest.mark.parametrize("kind", ["deltatune", "peft"])
def test_an_oversized_config_is_refused_before_anything_is_allocated(tmp_path: Path, kind: str) -> None:
    model = toy()
    dt.inject(model, dt.LoRA(rank=4), targets=["0", "2"])
    folder = tmp_path / "adapter"
    if kind == "peft":
        dt.export_peft(model, folder)
        edit_json(folder / "adapter_config.json", r=5_000_000)
    else:
        dt.save(model, folder)
        edit_json(folder / "adapter_config.json", **{"config.rank": 5_000_000})
    out = run_limited(tmp_path, folder, "import_peft" if kind == "peft" else "load")
    assert "REFUSED" in out and "ADAPTED False" in out, out
    # The field, the value the config gives, the value the tensors hold, and both sizes:
    if kind == "peft":
        assert "r / rank_pattern do not match" in out and "'0': the config gives rank 5,000,000" in out, out
        assert "the tensors hold 4 (lora_A (4, 384), lora_B (384, 4))" in out, out
    else:
        assert "'0' needs 15,360,000,000 bytes with rank=5000000, the file holds 12,288" in out, out
        assert "lora_A (4, 384), lora_B (384, 4)): it holds rank=4" in out, out


def test_an_override_and_a_shared_state_are_checked_too(tmp_path: Path) -> None:
    model = toy()
    dt.inject(model, dt.LoRA(rank=4), targets=["0", "2"])
    dt.save(model, tmp_path / "lora")
    edit_json(tmp_path / "lora" / "adapter_config.json", overrides={"^2$": {"rank": 4096}})
    with pytest.raises(ValueError, match=r"'2' needs 6,422,528 bytes with rank=4096.*it holds rank=4"):
        dt.load(toy(), tmp_path / "lora")
    bank = toy()
    dt.inject(bank, dt.VBLoRA(rank=4, num_vectors=16, vector_length=8, topk=2), targets=["0", "2"])
    dt.save(bank, tmp_path / "vblora")
    edit_json(tmp_path / "vblora" / "adapter_config.json", **{"config.num_vectors": 10**8})
    fresh = toy()
    with pytest.raises(
        ValueError, match=r"'deltatune_shared' needs .* with num_vectors=100000000.*holds num_vectors=16"
    ):
        dt.load(fresh, tmp_path / "vblora")
    assert not dt.has_adapters(fresh)


def test_a_cast_adapter_still_loads(tmp_path: Path) -> None:
    """Sizes are compared with the stored floats counted at the adapter's dtype too: an adapter saved
    from a model cast to bf16 loads onto a float32 base (as before the check), and a float32 one
    onto a float64 base."""
    model = toy()
    dt.inject(model, dt.LoRA(rank=4), targets=["0", "2"])
    model.to(torch.bfloat16)
    dt.save(model, tmp_path / "bf16")
    dt.load(toy(), tmp_path / "bf16", strict_base=False)
    model = toy()
    dt.inject(model, dt.LoRA(rank=4), targets=["0", "2"])
    dt.save(model, tmp_path / "fp32")
    dt.load(toy().double(), tmp_path / "fp32", strict_base=False)


# -- provenance never breaks a save ---------------------------------------------------------------


def test_save_from_an_origin_that_cannot_be_looked_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model loaded from a folder this process cannot stat any more (another user's, an unmounted
    volume: ``PermissionError``) saves, recording the origin as it was given."""
    origin = tmp_path / "locked" / "model"
    origin.mkdir(parents=True)
    model = toy()
    model.config = type("Config", (), {"name_or_path": str(origin)})()  # (as transformers records it)
    dt.inject(model, dt.LoRA(rank=2), targets=["0"])
    real_stat = Path.stat

    def refused(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        if str(self).startswith(str(origin.parent)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "stat", refused)
    with pytest.raises(PermissionError):
        origin.is_dir()  # (what save() used to call, and fail on)
    dt.save(model, tmp_path / "a")
    dt.save(model, tmp_path / "b", base_model=str(origin))
    monkeypatch.undo()
    for name in ("a", "b"):
        assert io.read_config(tmp_path / name)["base_model"] == str(origin)


def test_save_from_an_origin_the_system_refuses_to_look_up(tmp_path: Path) -> None:
    """No mock: a name longer than the system allows (ENAMETOOLONG from stat) is recorded as given."""
    origin = str(tmp_path / ("m" * 300))
    model = toy()
    dt.inject(model, dt.LoRA(rank=2), targets=["0"])
    dt.save(model, tmp_path / "a", base_model=origin)
    assert io.read_config(tmp_path / "a")["base_model"] == origin
