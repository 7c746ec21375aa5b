"""DoRA (methods/lowrank/dora.py): math, closed forms, bad input and parity with PEFT's ``use_dora=True``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lowrank.dora import DoRA, DoRALayer

peft = pytest.importorskip("peft")


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5, bias=False), nn.Tanh(), nn.Linear(5, 3))


TARGETS = ["0", "2", "4"]


def perturb(layers: dict[str, nn.Module], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def reference(base: nn.Linear, layer: DoRALayer, x: torch.Tensor) -> torch.Tensor:
    """The paper's formula written out: W' = m ⊙ V / ‖V‖ with V = W0 + s B A, the norm over rows."""
    v = base.weight + layer.scale * layer.lora_B @ layer.lora_A
    w = layer.magnitude[:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True).detach()
    return nn.functional.linear(x, w, base.bias)


def test_forward_merge_and_closed_form() -> None:
    net = mlp()
    att = dt.inject(net, DoRA(rank=2, alpha=3.0), targets=TARGETS)
    layers = att.layers("default")
    perturb(layers)
    x = torch.randn(4, 6)
    out = net(x)
    h = x
    for i, module in enumerate(att.model):
        h = reference(att.wrappers[str(i)].base, layers[str(i)], h) if str(i) in layers else module(h)  # type: ignore[arg-type]
    torch.testing.assert_close(out, h, atol=1e-6, rtol=1e-5)
    # Closed forms: r (in + out) + out trainable, 4 bytes each.
    expected = sum(2 * (i + o) + o for i, o in [(6, 8), (8, 5), (5, 3)])
    assert att.closed_form("default") == (expected, 4 * expected)
    assert sum(p.numel() for p in dt.trainable_parameters(net)) == expected
    merged = dt.merge(copy.deepcopy(net))
    assert all(type(merged[int(p)]) is nn.Linear for p in TARGETS)
    torch.testing.assert_close(merged(x), out, atol=1e-6, rtol=1e-5)


def test_magnitude_starts_at_row_norms_and_norm_is_detached() -> None:
    net = mlp()
    att = dt.inject(net, DoRA(rank=2), targets=["0"])
    layer = att.layers("default")["0"]
    assert isinstance(layer, DoRALayer)
    torch.testing.assert_close(layer.magnitude.detach(), torch.linalg.norm(net[0].base.weight, dim=1))
    perturb({"0": layer})
    assert not layer.row_norm(net[0].base.weight).requires_grad


@pytest.mark.parametrize("kind", ["embedding", "conv1d"])
def test_refuses_other_module_kinds(kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    module: nn.Module = (
        nn.Embedding(10, 4) if kind == "embedding" else transformers.pytorch_utils.Conv1D(4, 3)
    )
    net = nn.Sequential(module)
    with pytest.raises(ValueError, match=r"DoRA: '0' is (Embedding|Conv1D)"):
        dt.inject(net, DoRA(rank=2), targets=["0"])
    assert not dt.has_adapters(net)


def peft_dora(net: nn.Module, **extra: object) -> nn.Module:
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True, **extra)
    return peft.get_peft_model(net, config)


def test_peft_import_same_logits_and_gradients(tmp_path: Path) -> None:
    pm = peft_dora(mlp())
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    ours = mlp()
    att = dt.import_peft(ours, tmp_path, trainable=True)
    assert isinstance(att.info("default").method, DoRA)
    x = torch.randn(5, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    theirs_out = pm(x)
    theirs_out.square().sum().backward()
    ours_out = ours(x2)
    ours_out.square().sum().backward()
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    theirs = dict(pm.named_parameters())
    for path, layer in att.layers("default").items():
        pre = f"base_model.model.{path}."
        for ours_name, their_name in [
            ("lora_A", "lora_A.default.weight"),
            ("lora_B", "lora_B.default.weight"),
            ("magnitude", "lora_magnitude_vector.default.weight"),
        ]:
            mine = getattr(layer, ours_name)
            torch.testing.assert_close(mine.grad, theirs[pre + their_name].grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"2": {"rank": 3, "alpha": 5.0}}], ids=["plain", "patterns"])
def test_export_loads_in_peft_and_round_trips(overrides: dict[str, dict[str, float]], tmp_path: Path) -> None:
    net = mlp()
    att = dt.inject(net, DoRA(rank=2, alpha=3.0), targets=TARGETS, overrides=overrides)
    perturb(att.layers("default"))
    x = torch.randn(5, 6)
    expected = net(x)
    folder = dt.export_peft(net, tmp_path / "out")
    pm = peft.PeftModel.from_pretrained(mlp(), folder)
    torch.testing.assert_close(pm(x), expected, atol=1e-5, rtol=1e-5)
    again = mlp()
    back = dt.import_peft(again, folder)
    torch.testing.assert_close(again(x), expected, atol=0, rtol=0)
    assert back.info("default").configs == att.info("default").configs


def test_dropout_matches_peft_in_training() -> None:
    pm = peft_dora(mlp(), lora_dropout=0.5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    ours = mlp()
    att = dt.inject(ours, DoRA(rank=2, alpha=3.0, dropout=0.5), targets=TARGETS)
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for path, layer in att.layers("default").items():
            pre = f"base_model.model.{path}."
            layer.lora_A.copy_(theirs[pre + "lora_A.default.weight"])
            layer.lora_B.copy_(theirs[pre + "lora_B.default.weight"])
            layer.magnitude.copy_(theirs[pre + "lora_magnitude_vector.default.weight"])
    pm.train()
    ours.train()
    x = torch.randn(5, 6)
    torch.manual_seed(7)
    a = pm(x)
    torch.manual_seed(7)
    b = ours(x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_import_refuses_missing_magnitude(tmp_path: Path) -> None:
    net = mlp()
    dt.inject(net, DoRA(rank=2), targets=TARGETS)
    folder = dt.export_peft(net, tmp_path / "out")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.2.lora_magnitude_vector"]
    save_file(tensors, folder / "adapter_model.safetensors")
    fresh = mlp()
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        dt.import_peft(fresh, folder)
    assert not dt.has_adapters(fresh)
