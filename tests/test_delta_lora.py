"""Delta-LoRA: the telescoped W update (a snapshot at step K, never a change to the base) gives the
same outputs and gradients as really updating a copy of W after every optimizer step."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
import deltatune.runtime.stepping as st
from deltatune.contract import hooks
from deltatune.methods.lowrank.delta_lora import DeltaLoRA, DeltaLoRALayer
from deltatune.methods.lowrank.lora import LoRALayer

IN, OUT = 32, 24


def _base(net: nn.Sequential) -> nn.Linear:
    """The adapted Linear under the wrapper (or the merged/unloaded Linear)."""
    module = net[0]
    base = getattr(module, "base", module)
    assert isinstance(base, nn.Linear)
    return base


def _net(method: DeltaLoRA, seed: int = 0) -> tuple[nn.Sequential, DeltaLoRALayer]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, OUT))
    dt.inject(net, method, targets=["0"], seed=seed)
    layer = dt.attachment_of(net).layers("default")["0"]
    assert isinstance(layer, DeltaLoRALayer)
    return net, layer


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, IN, generator=g), torch.randn(16, OUT, generator=g)


class Naive(nn.Module):
    """The paper's algorithm as written: W is a real tensor, moved after every step past K."""

    def __init__(self, base: nn.Linear, layer: DeltaLoRALayer, lam: float, warmup: int) -> None:
        super().__init__()
        self.W = base.weight.detach().clone()
        self.b = base.bias.detach().clone()
        self.A = nn.Parameter(layer.lora_A.detach().clone())
        self.B = nn.Parameter(layer.lora_B.detach().clone())
        self.s, self.lam, self.warmup = layer.scale, lam, warmup
        self.previous = self.product()

    def product(self) -> torch.Tensor:
        return (self.B @ self.A).detach() * self.s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.W, self.b) + F.linear(F.linear(x, self.A), self.B) * self.s

    def after_step(self, step: int) -> None:
        now = self.product()
        if step > self.warmup:  # W_{t+1} = W_t + λ·(s B_{t+1} A_{t+1} − s B_t A_t) for t >= K
            self.W += self.lam * (now - self.previous)
        self.previous = now


def _optimizer(kind: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_equals_really_updating_w(optimizer: str, warmup: int) -> None:
    method = DeltaLoRA(rank=4, alpha=8, lam=2.0, warmup_steps=warmup)
    net, layer = _net(method)
    naive = Naive(_base(net), layer, lam=2.0, warmup=warmup)
    W0 = _base(net).weight.detach().clone()
    opt = _optimizer(optimizer, dt.trainable_parameters(net))
    naive_opt = _optimizer(optimizer, [naive.A, naive.B])
    for step in range(1, 11):
        x, y = _batch(step)
        out, naive_out = net(x), naive(x)
        torch.testing.assert_close(out, naive_out, rtol=1e-5, atol=1e-5)
        ((out - y).square().mean() + st.regularization(net)).backward()
        (naive_out - y).square().mean().backward()
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
        assert naive.A.grad is not None and naive.B.grad is not None
        torch.testing.assert_close(layer.lora_A.grad, naive.A.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, naive.B.grad, rtol=1e-5, atol=1e-6)
        opt.step()
        naive_opt.step()
        st.on_step(net, step, opt)
        naive.after_step(step)
        opt.zero_grad()
        naive_opt.zero_grad()
        assert layer.started == (step >= warmup)
    assert torch.equal(_base(net).weight, W0)  # the base is never modified
    assert not torch.allclose(naive.W, W0)  # ... while the paper's W has moved
    x, _ = _batch(99)
    torch.testing.assert_close(net(x), naive(x), rtol=1e-5, atol=1e-5)
    # The total W update is λ·s·(B_T A_T − B_K A_K).
    expected = 2.0 * layer.scale * (layer.lora_B @ layer.lora_A - layer.snapshot_B @ layer.snapshot_A)
    torch.testing.assert_close(naive.W - W0, expected.detach(), rtol=1e-4, atol=1e-5)


def test_before_k_it_is_lora_and_the_snapshot_is_taken_at_k() -> None:
    net, layer = _net(DeltaLoRA(rank=4, warmup_steps=3))
    torch.manual_seed(0)
    lora = nn.Sequential(nn.Linear(IN, OUT))
    lora_layer = dt.inject(lora, dt.LoRA(rank=4), targets=["0"]).layers("default")["0"]
    assert isinstance(lora_layer, LoRALayer)
    opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    for step in range(1, 5):
        x, y = _batch(step)
        with torch.no_grad():
            lora_layer.lora_A.copy_(layer.lora_A)
            lora_layer.lora_B.copy_(layer.lora_B)
        if step <= 3:
            assert torch.equal(net(x), lora(x)) and not layer.started
        (net(x) - y).square().mean().backward()
        opt.step()
        product = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
        st.on_step(net, step, opt)
        opt.zero_grad()
        if step == 3:
            assert layer.started
            assert torch.equal(layer.snapshot_A, product[0]) and torch.equal(layer.snapshot_B, product[1])
            assert layer.lowrank_factors() is not None  # rank 3r through the fused kernel
    assert not torch.equal(net(x), lora(x))


def test_merge_is_w0_plus_the_closed_form() -> None:
    lam = 1.5
    net, layer = _net(DeltaLoRA(rank=4, lam=lam, warmup_steps=1))
    opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    for step in range(1, 5):
        x, y = _batch(step)
        (net(x) - y).square().mean().backward()
        opt.step()
        st.on_step(net, step, opt)
        opt.zero_grad()
    s = layer.scale
    A, B, AK, BK = layer.lora_A, layer.lora_B, layer.snapshot_A, layer.snapshot_B
    expected = s * (1 + lam) * (B @ A) - lam * s * (BK @ AK)
    torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-6, atol=1e-7)
    x, _ = _batch(99)
    out = net(x).detach()
    W0 = _base(net).weight.detach().clone()
    merged = dt.merge(copy.deepcopy(net))
    assert isinstance(merged, nn.Sequential)
    torch.testing.assert_close(_base(merged).weight, W0 + expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-5)
    base = _base(net)
    dt.unload(net)
    assert net[0] is base and torch.equal(base.weight, W0)  # the same object, untouched


def _train(net: nn.Sequential, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = _batch(step)
        (net(x) - y).square().mean().backward()
        opt.step()
        st.on_step(net, step, opt)
        opt.zero_grad()


@pytest.mark.parametrize("steps", [0, 2, 6])
def test_save_load_round_trip_and_closed_form(steps: int, tmp_path: Path) -> None:
    method = DeltaLoRA(rank=4, warmup_steps=3)
    net, layer = _net(method)
    opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    _train(net, opt, range(1, steps + 1))
    dt.save(net, tmp_path)
    stored = sum(t.numel() * t.element_size() for t in layer.export_state().values())
    assert stored == dt.attachment_of(net).closed_form("default")[1] == 4 * 2 * 4 * (IN + OUT) + 1
    assert dt.attachment_of(net).closed_form("default")[0] == 4 * (IN + OUT)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(IN, OUT))
    dt.load(fresh, tmp_path, trainable=True)
    loaded = dt.attachment_of(fresh).layers("default")["0"]
    assert isinstance(loaded, DeltaLoRALayer) and loaded.started == layer.started == (steps >= 3)
    x, _ = _batch(99)
    assert torch.equal(fresh(x), net(x))


@pytest.mark.parametrize("steps", [2, 5])
def test_checkpoint_mid_training_continues_identically(steps: int) -> None:
    method = DeltaLoRA(rank=4, warmup_steps=3)
    net, _ = _net(method)
    opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    _train(net, opt, range(1, steps + 1))
    fresh, _ = _net(method)
    st.load_step_state(fresh, st.step_state(net))
    with torch.no_grad():
        for a, b in zip(dt.trainable_parameters(net), dt.trainable_parameters(fresh), strict=True):
            b.copy_(a)
    fresh_opt = torch.optim.AdamW(dt.trainable_parameters(fresh), lr=1e-2)
    fresh_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(net, opt, range(steps + 1, 9))
    _train(fresh, fresh_opt, range(steps + 1, 9))
    x, _ = _batch(99)
    assert torch.equal(fresh(x), net(x))


def test_for_steps_refuses_a_warm_up_as_long_as_the_run() -> None:
    method = hooks(DeltaLoRA(warmup_steps=10))
    with pytest.raises(ValueError, match="DeltaLoRA.warmup_steps"):
        method.for_steps(10, {"warmup_steps"})
    assert method.for_steps(11, set()) == DeltaLoRA(warmup_steps=10)
    assert st.lr_factor(_net(DeltaLoRA())[0], 7) == 1.0


def test_refuses_a_4_bit_base_in_either_order() -> None:
    """inject on a quantised base, and quantize() after inject: both refuse, saying why."""
    pytest.importorskip("torchao")
    from deltatune.runtime.quant import quantize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    quantize(net, targets=["0"])
    with pytest.raises(
        ValueError,
        match=r"DeltaLoRA: '0' has a quantised weight \(NF4Linear\); Delta-LoRA "
        r"updates W itself .* cannot be done in 4 bits: use LoRA \(QLoRA\)",
    ):
        dt.inject(net, DeltaLoRA(rank=2), targets=["0"])
    dt.inject(net, DeltaLoRA(rank=2), targets=["1"])
    x = torch.randn(2, 128)
    before = net(x)
    with pytest.raises(
        ValueError,
        match=r"quantize: '1' carries adapter 'default' \(DeltaLoRA\); Delta-LoRA "
        r"updates W itself .* cannot be done in 4 bits",
    ):
        quantize(net, targets=["1"])
    assert type(dt.attachment_of(net).wrappers["1"].base) is nn.Linear and torch.equal(net(x), before)


@pytest.mark.parametrize("fields", [{"lam": -1.0}, {"warmup_steps": -1}, {"rank": 0}, {"lam": float("nan")}])
def test_bad_fields_name_the_field(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"DeltaLoRA.{next(iter(fields))}"):
        DeltaLoRA(**fields)
