"""What a fused attention kernel keeps for backward, on the ``meta`` device (for the estimator).

On the meta device ``torch.nn.functional.scaled_dot_product_attention`` decomposes into the math path
(``softmax(QKᵀ)V``), whose autograd keeps the T x T probabilities of every head. The kernels that run
for real do not: PyTorch's CPU flash kernel, FlashAttention and the GPU's memory-efficient kernel keep
Q, K, V, the output and one float32 log-sum-exp per query (the CPU kernel also an explicit mask), and
recompute the probabilities in backward. Within :func:`fused_attention_on_meta`, a call on meta
tensors goes through :class:`_Fused`, which keeps exactly those tensors and does the kernels' matrix
products (forward: QKᵀ and PV; backward: QKᵀ again, then dV, dP, dQ and dK), so that the saved bytes
and the FLOPs counted are the real kernel's. Calls on other devices go to PyTorch unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["fused_attention_on_meta"]

_LOCK = threading.Lock()
_DEPTH = [0]
_ORIGINAL: list[Any] = []
_MODE = threading.local()  # this thread's kind ("sdpa" or "flash"; unset: the math path as PyTorch does)


class _Fused(torch.autograd.Function):
    """Scaled dot-product attention as a fused kernel keeps it (meta tensors only)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        keep_mask: bool,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        out: torch.Tensor = _ORIGINAL[0](q, k, v, attn_mask=mask, **kwargs)  # QKᵀ and PV, counted
        if out.dim() == 4:  # the kernels write (batch, tokens, heads, dim) and return a transposed view,
            out = out.transpose(1, 2).contiguous().transpose(1, 2)  # so the heads' merge copies nothing
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # one log-sum-exp per query and head
        extra = []
        if keep_mask and mask is not None:  # (the CPU kernel keeps a boolean mask as an additive one)
            extra = [mask if mask.is_floating_point() else mask.to(q.dtype)]
        ctx.save_for_backward(q, k, v, out, lse, *extra)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v = ctx.saved_tensors[:3]
        # The kernel recomputes P = softmax(QKᵀ) and forms dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K, dK = dSᵀ Q:
        # five products of the forward's size, done here on meta tensors so that FLOPs are counted.
        groups = q.shape[-3] // k.shape[-3]  # grouped-query attention: K and V serve several heads
        keys = k.repeat_interleave(groups, dim=-3) if groups > 1 else k
        values = v.repeat_interleave(groups, dim=-3) if groups > 1 else v
        p = torch.matmul(q, keys.transpose(-2, -1))
        torch.matmul(p.transpose(-2, -1), grad)
        d_p = torch.matmul(grad, values.transpose(-2, -1))
        torch.matmul(d_p, keys)
        torch.matmul(d_p.transpose(-2, -1), q)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None, None


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs: Any
) -> torch.Tensor:
    mode = getattr(_MODE, "kind", None)
    out: torch.Tensor
    if mode is None or q.device.type != "meta" or not torch.is_grad_enabled():
        out = _ORIGINAL[0](q, k, v, attn_mask=attn_mask, **kwargs)
    else:
        out = _Fused.apply(q, k, v, attn_mask, mode == "sdpa", kwargs)
    return out


@contextlib.contextmanager
def fused_attention_on_meta(kind: str) -> Iterator[None]:
    """Within the block, this thread's scaled dot-product attention on meta tensors keeps what the
    ``kind`` kernel keeps (``"sdpa"``: PyTorch's fused kernel, with an explicit mask;
    ``"flash"``: FlashAttention, no mask); ``"eager"`` changes nothing (the model does not call it)."""
    import torch.nn.functional as F

    with _LOCK:
        if _DEPTH[0] == 0:
            _ORIGINAL[:] = [F.scaled_dot_product_attention]
            F.scaled_dot_product_attention = _attention  # type: ignore[assignment]
        _DEPTH[0] += 1
    before = getattr(_MODE, "kind", None)
    _MODE.kind = None if kind == "eager" else kind
    try:
        yield
    finally:
        _MODE.kind = before
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                F.scaled_dot_product_attention = _ORIGINAL[0]
