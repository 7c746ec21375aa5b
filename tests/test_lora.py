"""LoRA's own math: closed forms, scaling, initialisers, per-module overrides, exact combination."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.lowrank.lora import LoRALayer
from deltatune.runtime.wrapper import attachment_of


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))


@pytest.mark.parametrize(
    ("rank", "alpha", "stabilized", "scale"), [(8, 16, False, 2.0), (16, 8, True, 2.0), (4, 1, False, 0.25)]
)
def test_scale(rank: int, alpha: float, stabilized: bool, scale: float) -> None:
    assert dt.LoRA(rank=rank, alpha=alpha, rank_stabilized=stabilized).scale == pytest.approx(scale)


def test_forward_is_the_paper_equation() -> None:
    model = net()
    att = dt.inject(model, dt.LoRA(rank=3, alpha=6), targets=["0"])
    layer = att.layers("default")["0"]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12)
    W0, b = model[0].base.weight, model[0].base.bias
    expected = x @ W0.T + b + (6 / 3) * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(model[0](x), expected, atol=1e-5)


def test_closed_form_counts() -> None:
    model = net()
    att = dt.inject(model, dt.LoRA(rank=4), targets=["0", "2"])
    expected = 4 * (12 + 20) + 4 * (20 + 6)
    assert att.closed_form("default") == (expected, 4 * expected)
    report = dt.parameter_report(model)
    assert report.trainable == expected
    assert report.stored_bytes == 4 * expected
    assert report.total == sum(p.numel() for p in model.parameters())
    assert "trainable" in str(report)


def test_kaiming_and_gaussian_init() -> None:
    lin = nn.Linear(400, 300)
    g = torch.Generator().manual_seed(0)
    layer = dt.LoRA(rank=64).wrap(lin, None, path="x", generator=g)
    bound = 1 / math.sqrt(400)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(layer.lora_B) == 0
    gl = dt.LoRA(rank=64, init=dt.Gaussian()).wrap(lin, None, path="x", generator=g)
    assert gl.lora_A.std().item() == pytest.approx(1 / 64, rel=0.05)
    emb = dt.LoRA(rank=4).wrap(nn.Embedding(100, 32), None, path="e", generator=g)
    assert torch.count_nonzero(emb.lora_A) == 0 and emb.lora_B.std().item() == pytest.approx(1, rel=0.2)


def test_conv1d_delta_weight_uses_fan_in_fan_out_layout() -> None:
    conv = Conv1D(10, 6)  # weight (in=6, out=10)
    layer = dt.LoRA(rank=2).wrap(conv, None, path="c", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.delta_weight().shape == conv.weight.shape
    x = torch.randn(3, 6)
    assert torch.allclose(
        conv(x) + layer.delta(x), x @ (conv.weight + layer.delta_weight()) + conv.bias, atol=1e-5
    )


def test_per_module_overrides() -> None:
    model = net()
    att = dt.inject(
        model, dt.LoRA(rank=4, alpha=4), targets=["0", "2"], overrides={"2": {"rank": 2, "alpha": 8}}
    )
    layers = att.layers("default")
    assert layers["0"].lora_A.shape == (4, 12) and layers["0"].scale == 1.0
    assert layers["2"].lora_A.shape == (2, 20) and layers["2"].scale == 4.0
    assert att.closed_form("default")[0] == 4 * 32 + 2 * 26


def test_override_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"no field\(s\) \['ranks'\]"):
        dt.inject(net(), dt.LoRA(), targets=["0"], overrides={"0": {"ranks": 2}})
    with pytest.raises(ValueError, match="LoRA.rank must be an integer >= 1, got 0"):
        dt.inject(net(), dt.LoRA(), targets=["0"], overrides={"0": {"rank": 0}})
    with pytest.raises(ValueError, match="matches none of the targeted modules"):
        dt.inject(net(), dt.LoRA(), targets=["0"], overrides={"2": {"rank": 2}})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "LoRA.rank must be an integer >= 1, got 0"),
        ({"rank": 2.0}, "LoRA.rank must be an integer"),
        ({"alpha": 0}, "LoRA.alpha must be a finite number > 0, got 0"),
        ({"dropout": 1.0}, r"LoRA.dropout must be a number in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"LoRA.dropout must be a number in \[0, 1\)"),
        ({"init": "gaussian"}, "LoRA.init must be one of LoRAInit"),
    ],
)
def test_bad_config(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dt.LoRA(**kwargs)  # type: ignore[arg-type]


def test_combination_is_exact() -> None:
    model = net()
    dt.inject(model, dt.LoRA(rank=2, alpha=4), targets=["0", "2"], name="a", seed=1)
    dt.inject(model, dt.LoRA(rank=3, alpha=3, rank_stabilized=True), targets=["0"], name="b", seed=2)
    att = attachment_of(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in ("a", "b"):
            for layer in att.layers(n).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    dt.combine(model, {"a": 0.7, "b": -1.5}, name="ab", missing="zero")
    for path in ("0", "2"):
        layers = {n: att.wrappers[path].adapters[n] for n in att.wrappers[path].adapters}
        expected = 0.7 * layers["a"].delta_weight()
        if "b" in layers:
            expected = expected - 1.5 * layers["b"].delta_weight()
        assert torch.allclose(layers["ab"].delta_weight(), expected, atol=1e-6)
    assert att.layers("ab")["0"].lora_A.shape[0] == 5 and att.layers("ab")["2"].lora_A.shape[0] == 2
    x = torch.randn(5, 12)
    dt.set_active(model, ["a", "b"])
    both = model(x)
    dt.combine(model, {"a": 1.0, "b": 1.0}, name="sum", missing="zero")
    dt.set_active(model, "sum")
    assert torch.allclose(model(x), both, atol=1e-5)
    for weight in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match=r"combine: weights must be finite numbers, got \{'b': "):
            dt.combine(model, {"a": 1.0, "b": weight}, name="bad")  # type: ignore[dict-item]
    assert "bad" not in att.adapters


def test_combined_adapter_saves_and_loads(tmp_path: object) -> None:
    model = net()
    dt.inject(model, dt.LoRA(rank=2), targets=["0", "2"], name="a")
    dt.inject(model, dt.LoRA(rank=4), targets=["0"], name="b")
    dt.combine(model, {"a": 0.5, "b": 0.5}, name="mix", missing="zero")
    dt.set_active(model, "mix")
    x = torch.randn(2, 12)
    out = model(x)
    dt.save(model, tmp_path, adapter="mix")  # type: ignore[arg-type]
    fresh = net()
    dt.load(fresh, tmp_path)  # type: ignore[arg-type]
    assert torch.equal(fresh(x), out)


def test_several_adapters_add_when_active_together() -> None:
    model = net()
    dt.inject(model, dt.LoRA(rank=2), targets=["0"], name="a", seed=1)
    dt.inject(model, dt.LoRA(rank=2), targets=["0", "2"], name="b", seed=2)
    att = attachment_of(model)
    for n in ("a", "b"):
        for layer in att.layers(n).values():
            with torch.no_grad():
                layer.lora_B.normal_()
    x = torch.randn(3, 12)
    with dt.disabled(model):
        base = model(x)
    dt.set_active(model, "a")
    da = model(x) - base
    dt.set_active(model, ["a", "b"])
    both = model[0](x)
    assert torch.allclose(
        both, model[0].base(x) + att.layers("a")["0"].delta(x) + att.layers("b")["0"].delta(x)
    )
    assert not torch.allclose(model(x) - base, da)


def test_dropout_only_in_training() -> None:
    model = net()
    dt.inject(model, dt.LoRA(rank=4, dropout=0.5), targets=["0"])
    with torch.no_grad():
        attachment_of(model).layers("default")["0"].lora_B.normal_()
    x = torch.randn(8, 12)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_layer_type() -> None:
    layer = dt.LoRA().wrap(nn.Linear(8, 8), None, path="p", generator=torch.Generator())
    assert isinstance(layer, LoRALayer)
    with pytest.raises(ValueError, match="'p' is LayerNorm"):
        dt.LoRA().wrap(nn.LayerNorm(8), None, path="p", generator=torch.Generator())
