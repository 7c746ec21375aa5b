"""Issue 13, point 1: a verb that raises leaves the model as it was (the two reported cases).

The generic version, over every method and toy model, is in test_invariants.py
(``test_a_failed_verb_changes_nothing``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def state(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": {n: m for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "active": dt.attachment_of(model).active,
        "adapters": list(dt.attachment_of(model).adapters),
    }


def trained(model: nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.attachment_of(model).info(name).trainable:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_load_with_a_missing_tensor_keeps_the_active_adapter(tmp_path: Path) -> None:
    model = net()
    dt.inject(model, dt.LoRA(rank=2), targets=["0", "2"], name="a")
    trained(model, "a", 1)
    other = net()
    dt.inject(other, dt.LoRA(rank=2), targets=["0", "2"], name="b")
    trained(other, "b", 2)
    dt.save(other, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(tmp_path / "adapter.safetensors"))

    x = torch.randn(4, 8)
    expected, before = model(x), state(model)
    with pytest.raises(ValueError, match="missing tensors"):
        dt.load(model, tmp_path, name="b")
    after = state(model)
    assert after["active"] == ("a",)
    assert after["flags"] == before["flags"]
    assert any(after["flags"].values())  # "a" still trains
    assert after == before
    assert torch.equal(model(x), expected)


def test_import_peft_with_a_mismatched_head_keeps_the_active_adapter(tmp_path: Path) -> None:
    model = net()
    dt.inject(model, dt.LoRA(rank=2), targets=["0", "2"], name="a")
    trained(model, "a", 1)
    other = net()
    dt.inject(other, dt.LoRA(rank=2), targets=["0", "2"], modules_to_save=["4"])
    trained(other, "default", 2)
    dt.export_peft(other, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    head = next(k for k in tensors if k.endswith("4.weight"))
    tensors[head] = torch.zeros(5, 8)  # the model's head is (3, 8)
    save_file(tensors, str(weights), metadata={"format": "pt"})

    x = torch.randn(4, 8)
    expected, before = model(x), state(model)
    with pytest.raises(ValueError, match="mismatched shapes"):
        dt.import_peft(model, tmp_path, name="b")
    after = state(model)
    assert after["active"] == ("a",)
    assert after == before
    assert torch.equal(model(x), expected)


def test_a_failed_load_onto_a_bare_model_leaves_it_bare(tmp_path: Path) -> None:
    other = net()
    dt.inject(other, dt.LoRA(rank=2), targets=["0", "2"])
    dt.save(other, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    tensors.pop(sorted(tensors)[-1])
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    model = net()
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="missing tensors"):
        dt.load(model, tmp_path)
    assert not dt.has_adapters(model)
    assert dict(model.named_modules()) == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("init", ["plain", "pissa"])
def test_quantize_that_fails_part_way_quantises_nothing(monkeypatch: pytest.MonkeyPatch, init: str) -> None:
    pytest.importorskip("torchao")
    from deltatune.runtime import quant

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    method = dt.LoRA(rank=2, init=dt.PiSSA()) if init == "pissa" else dt.LoRA(rank=2)
    dt.inject(model, method, targets=["0", "1"])
    modules = dict(model.named_modules())
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    info = dt.attachment_of(model).info("default")
    configs, stored = dict(info.configs), info.method
    x = torch.randn(3, 64)
    expected = model(x)
    real = quant.NF4Linear.from_weight
    calls: list[int] = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(quant.NF4Linear, "from_weight", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        quant.quantize(model, targets=["0", "1"])
    assert dict(model.named_modules()) == modules
    assert not any(getattr(m, "quantized", False) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == tensors.keys()
    assert all(torch.equal(after[k], v) for k, v in tensors.items())
    assert (info.configs, info.method) == (configs, stored)
    assert torch.equal(model(x), expected)
