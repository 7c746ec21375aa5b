"""Bottleneck adapters: the math against hand-written references, placements, sizes, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune import anatomy
from deltatune.methods.adapter import AdapterLayer
from test_anatomy import INTER, LAYERS, W, tiny_bert, tiny_gpt2, tiny_llama


def randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def bottleneck(
    layer: AdapterLayer, h: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Houlsby et al. Fig. 2, written out: up(f(down(h)))."""
    z = f(h @ layer.down.T + layer.down_bias)
    return z @ layer.up.T + layer.up_bias


@pytest.mark.parametrize(("nonlinearity", "f"), [("relu", F.relu), ("gelu", F.gelu), ("tanh", torch.tanh)])
@pytest.mark.parametrize("scaling", [1.0, 4.0])
def test_sequential_adapter_on_a_linear(nonlinearity: str, f: Any, scaling: float) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    net = nn.Sequential(lin)
    dt.inject(net, dt.Adapter(bottleneck=3, nonlinearity=nonlinearity, scaling=scaling), targets=["0"])
    randomise(net)
    layer = dt.attachment_of(net).layers("default")["0"]
    assert isinstance(layer, AdapterLayer)
    x = torch.randn(4, 12)
    h = lin(x)
    expected = h + scaling * bottleneck(layer, h, f)  # the residual: h + s · A(h)
    assert torch.allclose(net(x), expected, atol=1e-6)


def test_houlsby_on_bert_equals_a_hook_reference() -> None:
    model = tiny_bert()
    att = dt.inject(model, dt.Adapter(placement="houlsby", reduction_factor=4))
    parts = anatomy.describe(model)
    assert list(att.info("default").targets) == parts.paths("attention_output", "ffn_output")
    randomise(model)
    ids = torch.randint(1, 100, (2, 7))
    adapted = model(input_ids=ids).logits

    # Reference: the plain model with forward hooks adding h + A(h) after the same projections.
    layers = att.layers("default")
    reference = tiny_bert()
    hooks = [
        reference.get_submodule(path).register_forward_hook(
            lambda m, a, out, layer=layer: out + bottleneck(layer, out, F.relu)
        )
        for path, layer in layers.items()
    ]
    expected = reference(input_ids=ids).logits
    for h in hooks:
        h.remove()
    assert torch.allclose(adapted, expected, atol=1e-5)
    with dt.disabled(model):
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_pfeiffer_goes_after_the_ffn_only() -> None:
    model = tiny_bert()
    att = dt.inject(model, dt.Adapter(placement="pfeiffer"))
    assert list(att.info("default").targets) == [
        f"bert.encoder.layer.{i}.output.dense" for i in range(LAYERS)
    ]
    # Default reduction factor 16 of width 32: bottleneck 2; 2·d·m + m + d per place.
    assert att.closed_form("default")[0] == LAYERS * (2 * W * 2 + 2 + W)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_parallel_adapter_reads_the_ffn_input(build: Callable[[], nn.Module]) -> None:
    model = build()
    att = dt.inject(model, dt.Adapter(placement="parallel", bottleneck=5, scaling=4.0))
    assert list(att.info("default").targets) == anatomy.describe(model).paths("ffn")
    randomise(model)
    ids = torch.randint(1, 100, (2, 6))
    adapted = model(input_ids=ids).logits
    reference = build()
    hooks = [
        reference.get_submodule(path).register_forward_hook(
            lambda m, a, out, layer=layer: out + 4.0 * bottleneck(layer, a[0], F.relu)
        )
        for path, layer in att.layers("default").items()
    ]
    expected = reference(input_ids=ids).logits
    for h in hooks:
        h.remove()
    assert torch.allclose(adapted, expected, atol=1e-5)


def test_parallel_needs_one_ffn_module() -> None:
    with pytest.raises(ValueError, match=r"placement='parallel'.*BertForSequenceClassification"):
        dt.inject(tiny_bert(), dt.Adapter(placement="parallel"))


def test_sizes_and_size_errors() -> None:
    lin = nn.Linear(64, 48)
    assert dt.Adapter(reduction_factor=8).width(lin) == (48, 6)
    assert dt.Adapter(bottleneck=7).width(lin) == (48, 7)
    assert dt.Adapter().width(lin) == (48, 3)  # neither given: reduction factor 16
    with pytest.raises(ValueError, match=r"Adapter.bottleneck must be None when reduction_factor is given"):
        dt.Adapter(reduction_factor=8, bottleneck=4)
    with pytest.raises(ValueError, match=r"Adapter.reduction_factor must be <= the width 48"):
        dt.inject(nn.Sequential(lin), dt.Adapter(reduction_factor=64), targets=["0"])
    with pytest.raises(ValueError, match=r"Adapter.placement must be one of"):
        dt.Adapter(placement="middle")


def test_explicit_targets_must_fit_the_placement() -> None:
    with pytest.raises(ValueError, match=r"placement='pfeiffer'.*attention.output.dense"):
        dt.inject(tiny_bert(), dt.Adapter(placement="pfeiffer"), targets=["attention.output.dense"])
    # A subset of the placement's places is fine.
    att = dt.inject(tiny_bert(), dt.Adapter(), targets=["bert.encoder.layer.2.output.dense"])
    assert att.info("default").targets == ("bert.encoder.layer.2.output.dense",)


def test_identity_at_init_not_mergeable_and_trains() -> None:
    model = tiny_llama()
    ids = torch.randint(1, 100, (2, 5))
    base = model(input_ids=ids).logits
    dt.inject(model, dt.Adapter(bottleneck=4))
    assert torch.equal(model(input_ids=ids).logits, base)
    with pytest.raises(ValueError, match="not mergeable"):
        dt.merge(model)
    params = dt.trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):
        model(input_ids=ids).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(model(input_ids=ids).logits, base)
    # The FFN output projection maps INTER -> W: the adapter after it is W wide.
    layer = dt.attachment_of(model).layers("default")["model.layers.0.mlp.down_proj"]
    assert tuple(layer.up.shape) == (W, 4) and INTER != W


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.gate = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x), self.gate(x)


def test_adapter_after_a_tuple_output_is_a_clear_error() -> None:
    net = nn.Sequential(TupleOut())
    dt.inject(net, dt.Adapter(bottleneck=2), targets=["0"])
    with pytest.raises(ValueError, match=r"Adapter at '0': the module's output is a tuple, not a tensor"):
        net(torch.randn(2, 6))


def test_parallel_save_load_route_and_disable(tmp_path: Path) -> None:
    """What the invariant suite checks for the default placement, for the parallel one (on GPT-2)."""
    model = tiny_gpt2()
    ids = torch.randint(1, 100, (3, 5))
    base = model(input_ids=ids).logits
    dt.inject(model, dt.Adapter(placement="parallel", bottleneck=3))
    dt.inject(model, dt.Adapter(placement="parallel", bottleneck=3), name="other", seed=1)
    randomise(model, seed=1)
    dt.set_active(model, "default")
    randomise(model, seed=2)
    mine = model(input_ids=ids).logits
    with dt.disabled(model):
        assert torch.equal(model(input_ids=ids).logits, base)
    dt.set_active(model, "other")
    other = model(input_ids=ids).logits
    with dt.route(model, ["default", None, "other"]):
        mixed = model(input_ids=ids).logits
    assert torch.allclose(mixed, torch.stack([mine[0], base[1], other[2]]), atol=1e-5)
    dt.set_active(model, "default")
    dt.save(model, tmp_path)
    fresh = tiny_gpt2()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(input_ids=ids).logits, mine)
