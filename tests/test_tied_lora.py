"""Tied-LoRA: tying by group (the last path component), the variants' counts, the update's math, and
the refusals (a group of mixed shapes, per-module rank overrides, bad fields). The invariant suite
runs it over every toy model by itself (``tests/test_invariants.py -k tied``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.methods.lowrank.tied_lora import TRAIN_OPTIONS, TiedLoRA, TiedLoRALayer
from deltatune.runtime.wrapper import attachment_of


class Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, width)
        self.out = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.out(torch.relu(self.fc(x))) + self.q_proj(x)
        return y


class Net(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 16, 16)) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(w) for w in widths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + block(x)
        return x


def _net(widths: tuple[int, ...] = (16, 16, 16)) -> Net:
    torch.manual_seed(0)
    return Net(widths)


TARGETS = [f"layers.{i}.{m}" for i in range(3) for m in ("q_proj", "fc", "out")]


def _layers(model: nn.Module) -> dict[str, TiedLoRALayer]:
    layers = attachment_of(model).layers("default")
    assert all(isinstance(la, TiedLoRALayer) for la in layers.values())
    return {p: la for p, la in layers.items() if isinstance(la, TiedLoRALayer)}


def _perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_one_pair_per_group_is_shared_by_every_layer_of_it() -> None:
    model = _net()
    dt.inject(model, TiedLoRA(rank=2), targets=TARGETS)
    layers = _layers(model)
    for suffix in ("q_proj", "fc", "out"):
        group = [layers[f"layers.{i}.{suffix}"] for i in range(3)]
        A0, B0 = group[0].tied()
        assert all(la.tied()[0] is A0 and la.tied()[1] is B0 for la in group)
    assert layers["layers.0.q_proj"].tied()[0] is not layers["layers.0.fc"].tied()[0]
    # u and v are per layer: nine of each, never shared.
    assert len({id(la.u) for la in layers.values()}) == len({id(la.v) for la in layers.values()}) == 9
    shared = attachment_of(model).shared("default")
    assert shared is not None
    assert sorted(n for n, _ in shared.named_parameters()) == [
        f"groups.{g}.lora_{f}" for g in ("fc", "out", "q_proj") for f in "AB"
    ]


def test_a_gradient_step_moves_every_tied_layer_together() -> None:
    model = _net()
    dt.inject(model, TiedLoRA(rank=2), targets=TARGETS)
    _perturb(model)  # (B = 0 at init: move away so that A gets a gradient too)
    layers = _layers(model)
    q = [layers[f"layers.{i}.q_proj"] for i in range(3)]
    A, B = q[0].tied()
    before = [la.delta_weight().detach().clone() for la in q]
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    model(x).pow(2).mean().backward()
    assert A.grad is not None and B.grad is not None and A.grad.abs().sum() > 0
    tied_grad = A.grad.clone()
    # Untied: each layer its own copy of A; the tied gradient is the sum of theirs.
    copies = [A.detach().clone().requires_grad_(True) for _ in q]
    for la, copy in zip(q, copies, strict=True):
        la.tied = _returning(copy, B)  # type: ignore[method-assign]
    model(x).pow(2).mean().backward()
    for la in q:
        del la.tied
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in copies)
    untied = torch.stack([c.grad for c in copies if c.grad is not None]).sum(0)
    assert torch.allclose(tied_grad, untied, atol=1e-6)
    model.zero_grad()
    model(x).pow(2).mean().backward()

    opt = torch.optim.SGD(dt.trainable_parameters(model), lr=0.5)
    opt.step()
    for la, old in zip(q, before, strict=True):
        assert la.tied()[0] is A  # still the one tensor, updated in place
        assert not torch.allclose(la.delta_weight(), old)
        u, v = la.u, la.v
        assert u is not None and v is not None
        expected = la.scale * (v[:, None] * B) @ (u[:, None] * A)
        assert torch.allclose(la.delta_weight(), expected)


def _returning(A: torch.Tensor, B: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    return lambda: (A, B)


def test_forward_is_the_scaled_tied_update_and_merges() -> None:
    model = _net()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    base = _net()(x)
    dt.inject(model, TiedLoRA(rank=3, alpha=6.0), targets=TARGETS)
    assert torch.equal(model(x), base)  # identity at init (B = 0)
    _perturb(model)
    la = _layers(model)["layers.1.fc"]
    A, B = la.tied()
    assert la.u is not None and la.v is not None
    h = torch.randn(7, 8)
    expected = 2.0 * la.v * ((la.u * (h @ A.t())) @ B.t())
    assert torch.allclose(la.delta(h), expected, atol=1e-6)
    out = model(x)
    merged = dt.merge(model)
    assert torch.allclose(merged(x), out, atol=1e-5)


@pytest.mark.parametrize("train", TRAIN_OPTIONS)
def test_closed_forms_of_every_variant(train: str, tmp_path: Path) -> None:
    model = _net()
    x = torch.randn(3, 8)
    base = _net()(x)
    att = dt.inject(model, TiedLoRA(rank=2, train=train), targets=TARGETS)
    assert torch.equal(model(x), base), train  # every variant starts at the base
    r, n = 2, 3  # rank, layers per group
    groups = {"q_proj": (8, 8), "fc": (8, 16), "out": (16, 8)}
    expected = sum(
        r * (i * ("A" in train) + o * ("B" in train)) + n * (r * ("u" in train) + o * ("v" in train))
        for i, o in groups.values()
    )
    stored = 4 * sum(r * (i + o) + n * (r * ("u" in train) + o * ("v" in train)) for i, o in groups.values())
    assert att.closed_form("default") == (expected, stored)
    assert sum(p.numel() for p in dt.trainable_parameters(model)) == expected
    dt.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == stored
    # Every variant can learn: one step moves the output.
    _perturb(model)
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in dt.trainable_parameters(model))
    fresh = _net()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(x), base)


def test_frozen_factors_are_saved_and_reloaded_exactly(tmp_path: Path) -> None:
    model = _net()
    dt.inject(model, TiedLoRA(rank=2, train="uv"), targets=TARGETS, seed=4)
    _perturb(model)
    x = torch.randn(3, 8)
    expected = model(x)
    assert all(p.shape[0] in (2, 8, 16) and p.dim() == 1 for p in dt.trainable_parameters(model))
    dt.save(model, tmp_path)
    fresh = _net()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(x), expected)


def test_a_group_of_mixed_shapes_is_refused_naming_its_modules() -> None:
    model = _net(widths=(16, 32, 16))
    with pytest.raises(ValueError, match=r"group 'fc'.*'layers\.0\.fc' \(in=8, out=16\).*'layers\.1\.fc'"):
        dt.inject(model, TiedLoRA(rank=2), targets=TARGETS)
    assert not dt.has_adapters(model)
    dt.inject(model, TiedLoRA(rank=2), targets=[t for t in TARGETS if "q_proj" in t])  # one shape: fine
    fresh = _net(widths=(16, 32, 16))
    bases = {t: fresh.get_submodule(t) for t in TARGETS}
    with pytest.raises(ValueError, match="group 'fc'"):
        TiedLoRA(rank=2).shared_parameter_count(bases)


def test_bad_fields_and_per_module_rank_overrides_are_refused() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"TiedLoRA\.rank must be an integer >= 1"):
            TiedLoRA(rank=bad)
    with pytest.raises(ValueError, match=r"TiedLoRA\.train must be one of"):
        TiedLoRA(train="A")  # a frozen zero update: B and v frozen
    with pytest.raises(ValueError, match=r"TiedLoRA\.alpha must be"):
        TiedLoRA(alpha=0.0)
    model = _net()
    with pytest.raises(ValueError, match=r"'layers\.1\.fc' overrides rank or train"):
        dt.inject(model, TiedLoRA(rank=2), targets=TARGETS, overrides={"layers.1.fc": {"rank": 4}})
    assert not dt.has_adapters(model)
    # alpha and dropout are the layer's own: an override is fine.
    dt.inject(model, TiedLoRA(rank=2), targets=TARGETS, overrides={"layers.1.fc": {"alpha": 4.0}})
    assert _layers(model)["layers.1.fc"].scale == 2.0 and _layers(model)["layers.0.fc"].scale == 4.0


def test_group_names_that_are_container_attributes() -> None:
    class Holder(nn.Module):  # submodules named like ModuleDict's methods
        def __init__(self) -> None:
            super().__init__()
            self.keys = nn.Linear(4, 4)
            self.items = nn.Linear(4, 4)

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Holder()
            self.b = Holder()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = self.b.items(self.b.keys(self.a.items(self.a.keys(x))))
            return y

    model = Odd()
    att = dt.inject(model, TiedLoRA(rank=2), targets=["a.keys", "a.items", "b.keys", "b.items"])
    assert att.closed_form("default")[0] == 2 * 2 * (4 + 4) + 4 * (2 + 4)
    layers = _layers(model)
    assert layers["a.keys"].tied()[0] is layers["b.keys"].tied()[0]
    assert layers["a.keys"].tied()[0] is not layers["a.items"].tied()[0]
    x = torch.randn(2, 4)
    before = model(x)
    _perturb(model)
    assert not torch.equal(model(x), before)
