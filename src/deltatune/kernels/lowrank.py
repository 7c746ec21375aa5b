"""A fused kernel for ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ``: a frozen linear layer plus a low-rank update.

Written the plain way (``F.linear(x, W, b) + F.linear(F.linear(x, A), B)``), autograd allocates and
adds two full-size tensors that the fused form avoids: the ``(..., out)`` update is accumulated into
the base output inside the GEMM (``addmm_`` with beta = 1), and in the backward pass the update's
input gradient is accumulated into the base's input gradient the same way. The weight gradient of
the frozen ``W`` is never formed, and the input ``x`` is kept for the backward pass only when A
trains (a frozen A, as in LoRA-FA, needs just the rank-r ``h = A x`` for B's gradient). LoRA,
PiSSA, DoRA, LoRA-FA and VB-LoRA layers (any layer whose update is ``s · B A x``) run through it
when their module is a plain ``nn.Linear`` and nothing else intervenes (no hooks on the base, no
autocast, no dropout on the adapter input while training, one dtype); otherwise the wrapper uses
the plain form, which computes the same function.

Measured on 2 CPU cores (``benchmarks/speed.py``): the training step of an adapted SmolLM2-shaped
model drops from about 1.12x to about 1.06x the frozen-base floor (see the README's speed table).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        h = x2 @ A.t()  # (M, r)
        out = F.linear(x2, weight, bias)  # (M, out)
        out.addmm_(h, B.t(), alpha=scale)
        # Keep only what the gradients asked for need: x for A's (not with A frozen, as in LoRA-FA,
        # which is that method's memory saving), h for B's.
        need = ctx.needs_input_grad
        ctx.save_for_backward(x2 if need[3] else None, h if need[4] else None, weight, A, B)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, h, weight, A, B = ctx.saved_tensors
        scale: float = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])  # (M, out)
        gh = (g @ B).mul_(scale)  # (M, r): gradient of h = x Aᵀ
        gx = gA = gB = None
        if ctx.needs_input_grad[0]:
            gx = (g @ weight).addmm_(gh, A).view(ctx.x_shape)  # (M, in)
        if ctx.needs_input_grad[3]:
            gA = gh.t() @ x2  # (r, in)
        if ctx.needs_input_grad[4]:
            gB = (g.t() @ h).mul_(scale)  # (out, r)
        return gx, None, None, gA, gB, None


def fusable(base: nn.Module, x: Any) -> bool:
    """Whether ``base(x)`` is exactly ``F.linear(x, base.weight, base.bias)`` with both frozen."""
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return False
    if not isinstance(x, torch.Tensor) or x.dtype != base.weight.dtype or x.dim() < 2:
        return False
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    return not _autocast(x.device.type)


def _autocast(device_type: str) -> bool:
    if device_type == "meta":  # shapes only (deltatune.runtime.estimate): no autocast there
        return False
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4 has no device argument
        cpu = device_type == "cpu" and torch.is_autocast_cpu_enabled()
        return bool(cpu or torch.is_autocast_enabled())


def lowrank_linear(
    base: nn.Linear,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    *,
    bias: bool = True,
) -> torch.Tensor:
    """``base(x) + scale · (x Aᵀ) Bᵀ`` for a frozen ``nn.Linear`` ``base`` (see :func:`fusable`).

    Args:
        base: the frozen linear layer (weight ``(out, in)``).
        x: input ``(..., in)``, same dtype as the weight.
        A: ``(r, in)``; B: ``(out, r)``; both in the weight's dtype; may require grad.
        scale: the update's scalar factor.
        bias: add ``base.bias`` (False: ``x Wᵀ + scale · (x Aᵀ) Bᵀ``, for a caller that rescales the
            product before adding the bias, as DoRA does).
    """
    b = base.bias if bias else None
    if not torch.is_grad_enabled() or not (x.requires_grad or A.requires_grad or B.requires_grad):
        x2 = x.reshape(-1, x.shape[-1])
        y = F.linear(x2, base.weight, b)
        y.addmm_(x2 @ A.t(), B.t(), alpha=scale)
        return y.view(*x.shape[:-1], y.shape[-1])
    out: torch.Tensor = _LowRankLinear.apply(x, base.weight, b, A, B, scale)
    return out


# -- precision: in which dtype the adapter path computes ----------------------------------------

#: "input" (default): an adapter computes in its input's dtype (bf16 activations stay bf16; the small
#: float32 factors are cast, never the activations). "adapter": in the adapter's own dtype (float32),
#: the input widened inside the low-rank product (:func:`mixed_lowrank` keeps it narrow for backward).
#: A model's own policy is a property of the model (:func:`deltatune.set_adapter_precision`); a block
#: (:func:`adapter_precision_as`) overrides it for the thread or task that opens it. Nothing is global.
PRECISIONS = ("input", "adapter")
# The policy of the innermost adapter_precision_as block of this thread or task (None: none open):
# context-local, so a block in one thread never changes how another thread's forwards compute. While
# no block is open anywhere the ContextVar is not read (torch.compile cannot trace ContextVar.get).
_BLOCK: ContextVar[str | None] = ContextVar("deltatune_adapter_precision", default=None)
_BLOCKS_OPEN = [0]
_BLOCKS_LOCK = threading.Lock()


def adapter_precision() -> str:
    """The policy in force here: the innermost open block's, else ``"input"`` (see :data:`PRECISIONS`)."""
    return (_BLOCK.get() or "input") if _BLOCKS_OPEN[0] else "input"


def check_precision(mode: str) -> str:
    """``mode`` if it is one of :data:`PRECISIONS`, else a ``ValueError`` listing them."""
    if mode not in PRECISIONS:
        raise ValueError(f"adapter precision must be one of {', '.join(PRECISIONS)}, got {mode!r}")
    return mode


def _count_blocks(step: int) -> None:
    with _BLOCKS_LOCK:
        _BLOCKS_OPEN[0] += step


@contextlib.contextmanager
def adapter_precision_as(mode: str) -> Iterator[None]:
    """Within the block the policy is ``mode``; the previous one returns on exit. Context-local:
    other threads and asyncio tasks keep theirs."""
    token = _BLOCK.set(check_precision(mode))
    _count_blocks(+1)
    try:
        yield
    finally:
        _count_blocks(-1)
        _BLOCK.reset(token)


def model_precision(mode: str) -> contextlib.AbstractContextManager[None]:
    """The context a model's forward runs its adapters in when the model's own policy is ``mode``
    (:func:`deltatune.set_adapter_precision`): a block of ``mode`` unless one is open here already
    (a request's block wins over the model's setting); nothing to do for the default "input"."""
    if mode == "input" or (_BLOCKS_OPEN[0] and _BLOCK.get() is not None):
        return contextlib.nullcontext()
    return adapter_precision_as(mode)


def compute_dtype(x: torch.Tensor, reference: torch.Tensor) -> torch.dtype:
    """The dtype an adapter computes in for input ``x``: ``x``'s under the "input" policy (when it is a
    floating dtype), else ``reference``'s (the adapter's parameters)."""
    if adapter_precision() == "input" and x.is_floating_point():
        return x.dtype
    return reference.dtype


def lowrank_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, dropout: nn.Module | None = None
) -> torch.Tensor:
    """``scale · B A dropout(x)`` under the precision policy: in ``x``'s dtype with A and B cast (the
    "input" policy), or in A's dtype with ``x`` kept narrow for the backward pass ("adapter")."""
    dtype = compute_dtype(x, A)
    active = dropout is not None and dropout.training and not isinstance(dropout, nn.Identity)
    if dtype != x.dtype and not active:
        return mixed_lowrank(x, A, B, scale)
    h = x.to(dtype)
    if dropout is not None:
        h = dropout(h)
    h = F.linear(h, A.to(dtype))  # (..., r)
    # Scaling the rank-r activations is cheaper than scaling the (..., out) result.
    return F.linear(h * scale, B.to(dtype))  # (..., out)


class _MixedLowRank(torch.autograd.Function):
    """``s · (x Aᵀ) Bᵀ`` in the factors' dtype for an input of a lower precision (float32 adapters on
    a bf16 base), keeping ``x`` for A's gradient in its own dtype: autograd's plain form keeps the
    float32 copy ``x.to(A.dtype)``, once per adapted layer (q, k and v each a copy of one input),
    twice the bytes of a bf16 activation that several layers share. The arithmetic is the plain
    form's: ``x`` is widened to float32 in the forward and again in the backward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = x2.to(A.dtype) @ A.t()  # (M, r)
        need = ctx.needs_input_grad
        ctx.save_for_backward(x2 if need[1] else None, h if need[2] else None, A, B)
        ctx.scale = scale
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        out = (h * scale) @ B.t()
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, h, A, B = ctx.saved_tensors
        scale: float = ctx.scale
        g = grad.reshape(-1, grad.shape[-1]).to(A.dtype)  # (M, out)
        gh = (g @ B).mul_(scale)  # (M, r)
        gx = gA = gB = None
        if ctx.needs_input_grad[0]:
            gx = (gh @ A).to(ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gA = gh.t() @ x2.to(A.dtype)  # (r, in): x widened again, only for this product
        if ctx.needs_input_grad[2]:
            gB = (g.t() @ h).mul_(scale)  # (out, r)
        return gx, gA, gB, None


def mixed_lowrank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · (x Aᵀ) Bᵀ`` in A's dtype, for ``x`` of another floating dtype (:class:`_MixedLowRank`)."""
    if not torch.is_grad_enabled() or not (x.requires_grad or A.requires_grad or B.requires_grad):
        return F.linear(F.linear(x.to(A.dtype), A) * scale, B)
    out: torch.Tensor = _MixedLowRank.apply(x, A, B, scale)
    return out
