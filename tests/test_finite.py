"""Issue 13, point 2: non-finite values are refused in config fields and in loaded tensors.

Each case names the field or the tensor (and the file) and says what is expected.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.contract import REGISTRY
from deltatune.contract.fields import COMPONENTS, Check, Float

NON_FINITE = (math.nan, math.inf, -math.inf)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda v: dt.LoRA(alpha=v), "LoRA.alpha"),
        (lambda v: dt.VBLoRA(logits_std=v), "VBLoRA.logits_std"),
        (lambda v: dt.VBLoRA(bank_bound=v), "VBLoRA.bank_bound"),
        (lambda v: dt.Adapter(scaling=v), "Adapter.scaling"),
    ],
)
@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_fields_are_refused(make: object, field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{field} must be a finite number > 0, got -?(nan|inf)"):
        make(value)  # type: ignore[operator]


def test_every_float_field_refuses_non_finite_unless_it_opts_in() -> None:
    """Methods and their components (initialisers): every Float check refuses NaN and ±inf, and
    one that opts in with ``finite=False`` still refuses NaN."""
    classes = [*REGISTRY.values(), *COMPONENTS.values()]
    seen = 0
    for cls in classes:
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            if not isinstance(check, Float):
                continue
            seen += 1
            for value in NON_FINITE:
                assert not check.ok(value), f"{cls.__name__}.{f.name} accepts {value}"
            assert "finite" in check.describe() or math.isfinite(check.low + check.high)
    assert seen >= 8
    opt_in = Float(finite=False)
    assert opt_in.accepts_non_finite() and opt_in.ok(math.inf) and not opt_in.ok(math.nan)
    assert not Float().accepts_non_finite() and not Check().accepts_non_finite()


def test_overrides_with_non_finite_values_are_refused() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"LoRA.alpha must be a finite number > 0, got inf"):
        dt.inject(net, dt.LoRA(rank=2), targets=["0", "2"], overrides={"2": {"alpha": math.inf}})
    assert not dt.has_adapters(net)


def _saved(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    dt.inject(net, dt.LoRA(rank=2), targets=["0", "2"])
    dt.save(net, tmp_path / "native")
    dt.export_peft(net, tmp_path / "peft")
    return net, tmp_path


def _poison(file: Path, value: float) -> str:
    tensors = load_file(str(file))
    key = sorted(k for k, t in tensors.items() if t.is_floating_point())[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = value
    save_file(tensors, str(file))
    return key


@pytest.mark.parametrize("value", NON_FINITE)
def test_load_refuses_a_file_with_non_finite_values(tmp_path: Path, value: float) -> None:
    net, root = _saved(tmp_path)
    folder = root / "native"
    key = _poison(folder / "adapter.safetensors", value)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    fresh.load_state_dict(dt.unload(net).state_dict())
    x = torch.randn(3, 8)
    before = fresh(x)
    kind = "1 NaN, 0 inf" if math.isnan(value) else "0 NaN, 1 inf"
    with pytest.raises(ValueError, match=rf"{folder}.*non-finite values .*{key} \({kind} of \d+ values\)"):
        dt.load(fresh, folder)
    assert not dt.has_adapters(fresh)
    assert torch.equal(fresh(x), before)


@pytest.mark.parametrize("value", NON_FINITE)
def test_import_peft_refuses_a_file_with_non_finite_values(tmp_path: Path, value: float) -> None:
    net, root = _saved(tmp_path)
    folder = root / "peft"
    _poison(folder / "adapter_model.safetensors", value)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    fresh.load_state_dict(dt.unload(net).state_dict())
    with pytest.raises(
        ValueError, match=r"non-finite values \(expected finite numbers\) in tensors \[\d\.lora_"
    ):
        dt.import_peft(fresh, folder)
    assert not dt.has_adapters(fresh)


def test_finite_files_still_load(tmp_path: Path) -> None:
    net, root = _saved(tmp_path)
    x = torch.randn(3, 8)
    expected = net(x)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    fresh.load_state_dict(dt.unload(net).state_dict())
    dt.load(fresh, root / "native")
    assert torch.equal(fresh(x), expected)
