"""The fused low-rank linear kernel: same values and gradients as the plain form, and when it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.kernels.lowrank import fusable, lowrank_linear


def _plain(base: nn.Linear, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    return base(x) + s * F.linear(F.linear(x, A), B)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12)])
def test_values_and_gradients_match_the_plain_form(bias: bool, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 7, bias=bias).requires_grad_(False)
    A = torch.randn(3, 12, generator=g, requires_grad=True)
    B = torch.randn(7, 3, generator=g, requires_grad=True)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    up = torch.randn(*shape[:-1], 7, generator=g)
    grads = []
    for fn in (_plain, lowrank_linear):
        y = fn(base, x, A, B, 0.7)
        (y * up).sum().backward()
        grads.append((y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()))  # type: ignore[union-attr]
        x.grad = A.grad = B.grad = None
    for got, want in zip(grads[1], grads[0], strict=True):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_gradcheck_in_double() -> None:
    g = torch.Generator().manual_seed(1)
    base = nn.Linear(6, 5).double().requires_grad_(False)
    A = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: lowrank_linear(base, x, A, B, 1.3), (x, A, B))


def test_frozen_input_gets_no_gradient_and_no_grad_mode_works() -> None:
    base = nn.Linear(6, 5).requires_grad_(False)
    A = torch.randn(2, 6, requires_grad=True)
    B = torch.randn(5, 2, requires_grad=True)
    x = torch.randn(4, 6)
    lowrank_linear(base, x, A, B, 1.0).sum().backward()
    assert A.grad is not None and B.grad is not None and x.grad is None
    with torch.no_grad():
        assert torch.allclose(lowrank_linear(base, x, A, B, 2.0), _plain(base, x, A, B, 2.0), atol=1e-6)


def test_fusable_only_for_a_plain_frozen_linear() -> None:
    x = torch.randn(3, 4)
    lin = nn.Linear(4, 4).requires_grad_(False)
    assert fusable(lin, x)
    assert not fusable(lin, x.double())  # dtype differs from the weight
    assert not fusable(lin, torch.randn(4))  # a single vector: leave it to the plain path
    assert not fusable(nn.Linear(4, 4), x)  # a trainable weight needs its own gradient
    hooked = nn.Linear(4, 4).requires_grad_(False)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    assert not fusable(hooked, x)  # hooks must run
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fusable(lin, x)


def test_the_wrapper_uses_the_kernel_and_falls_back_with_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    import deltatune.runtime.wrapper as core  # the wrapper calls the kernel

    real = core.lowrank_linear

    def spy(*args: object) -> torch.Tensor:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(core, "lowrank_linear", spy)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    dt.inject(net, dt.LoRA(rank=2), targets=["0", "2"])
    net(torch.randn(3, 8)).sum().backward()
    assert len(calls) == 2
    drop = nn.Sequential(nn.Linear(8, 8))
    dt.inject(drop, dt.LoRA(rank=2, dropout=0.5), targets=["0"])
    drop.train()
    drop(torch.randn(3, 8))
    assert len(calls) == 2  # dropout on the adapter input: the plain path
    drop.eval()
    drop(torch.randn(3, 8))
    assert len(calls) == 3  # dropout is off in eval mode


def test_float32_factors_on_a_bf16_input_keep_the_input_not_a_float32_copy() -> None:
    """LoRA computing in its float32 factors' dtype on a bf16 base (the "adapter" precision policy):
    the same outputs and gradients as the plain autograd form, and autograd keeps the bf16 input
    (shared by q, k and v) instead of one float32 copy each."""
    import copy

    import deltatune as dt
    import deltatune.kernels.lowrank as lora_module

    torch.manual_seed(0)
    base = nn.ModuleDict({n: nn.Linear(16, 16) for n in ("q", "k", "v")}).to(torch.bfloat16)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = copy.deepcopy(base)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.p["q"](x) + self.p["k"](x) + self.p["v"](x)

    def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        saved: dict[int, int] = {}
        weights = {t.untyped_storage().data_ptr() for t in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        y.float().square().sum().backward()
        return y, [p.grad for p in dt.trainable_parameters(model)], sum(saved.values())

    model = Attn()
    dt.inject(model, dt.LoRA(rank=2), targets=["q", "k", "v"])
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.normal_(std=0.1)
    plain = copy.deepcopy(model)
    x = torch.randn(4, 8, 16, dtype=torch.bfloat16)
    with dt.adapter_precision_as("adapter"):
        y, grads, kept = run(model, x)
        original = lora_module.mixed_lowrank
        try:  # the plain autograd form, for reference
            lora_module.mixed_lowrank = lambda x, A, B, s: F.linear(F.linear(x.to(A.dtype), A) * s, B)
            y_ref, grads_ref, kept_ref = run(plain, x)
        finally:
            lora_module.mixed_lowrank = original
    assert torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    tokens, width = 4 * 8, 16
    assert kept_ref - kept == 3 * tokens * width * 4 - tokens * width * 2  # 3 float32 copies -> 1 bf16 x
