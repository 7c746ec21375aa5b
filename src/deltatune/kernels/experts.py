"""The forward pass of transformers' fused MoE experts with low-rank updates of their 3-D weights.

transformers 5 stores a MoE layer's experts as one module with one 3-D weight per projection
(``gate_up_proj`` or ``up_proj``, and ``down_proj``), each ``(experts, out, in)``, or ``(experts, in,
out)`` where the module says ``is_transposed``; its forward takes the tokens ``(T, hidden)``, the
router's choice ``top_k_index`` ``(T, k)`` and its weights ``top_k_weights`` ``(T, k)``. The update of
expert ``e``'s weight is ``s · B_e A_e`` (``A`` of shape ``(experts, r, in)``, ``B`` ``(experts, out,
r)``). A dense ``W + s · B A`` of the whole stack (what PEFT's ``target_parameters`` builds on every
forward) costs a second copy of every expert's weight; here the tokens are grouped by expert once and
each group gets ``x W_eᵀ + s · (x A_eᵀ) B_eᵀ``: the update costs ``r · (in + out)`` per token and
projection, and no expert's dense update is ever formed.

The computation is transformers' own generic one (``transformers.integrations.moe``): the module's
``_apply_gate`` (or ``act_fn`` without a gate), its biases and ``post_expert_norm`` where it declares
them, the routing weights applied after the down projection and the tokens summed in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ExpertUpdate:
    """One low-rank update of one 3-D expert weight: ``scale · B_e A_e`` for every expert ``e``.

    ``A`` is ``(experts, r, in)`` and ``B`` ``(experts, out, r)``; ``dropout`` acts on the update's
    input; ``rows`` (a ``(T,)`` float mask, or None for every token) limits it to some tokens: the
    examples that :func:`deltatune.route` gives the adapter.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout: nn.Module
    rows: torch.Tensor | None = None


def experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    updates: Mapping[str, Sequence[ExpertUpdate]],
) -> torch.Tensor:
    """The output of the experts ``module`` with ``updates`` (weight name -> its updates) added to
    its weights, for tokens ``hidden_states`` ``(T, hidden)`` routed by ``top_k_index`` and
    ``top_k_weights`` ``(T, k)``."""
    if getattr(module, "_is_expert_parallel", False):
        raise ValueError(
            f"{type(module).__name__} runs expert-parallel (its experts are spread over devices); "
            "deltatune's update of fused experts needs all of them on this device"
        )
    first = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    experts = int(getattr(module, first).shape[0])
    if top_k_index.ndim != 2 or top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"{type(module).__name__} was called with routing indices {tuple(top_k_index.shape)} and "
            f"weights {tuple(top_k_weights.shape)}; deltatune's fused-experts forward takes both as "
            "(tokens, k), as transformers' generic experts interface passes them"
        )
    tokens, k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)  # each token's choices, grouped by expert
    token_of = torch.arange(tokens, device=hidden_states.device).repeat_interleave(k)[order]
    counts = torch.bincount(expert_ids, minlength=experts + 1)[:experts].tolist()
    kept = sum(counts)  # (an index == experts is a padding choice: it sorts last and is dropped)
    token_of = token_of[:kept]
    x = hidden_states[token_of]
    h = _project(module, first, x, counts, token_of, updates.get(first, ()))
    between: Any = module._apply_gate if first == "gate_up_proj" else module.act_fn
    h = between(h)
    h = _project(module, "down_proj", h, counts, token_of, updates.get("down_proj", ()))
    if getattr(module, "has_post_expert_norm", False):
        norm: Any = module.post_expert_norm
        h = norm(h)
    h = h * top_k_weights.reshape(-1)[order[:kept]].unsqueeze(-1).to(h.dtype)
    out = torch.zeros(tokens, h.shape[-1], dtype=torch.float32, device=h.device)
    out.index_add_(0, token_of, h.float())
    return out.to(hidden_states.dtype)


def _project(
    module: nn.Module,
    name: str,
    x: torch.Tensor,
    counts: list[int],
    token_of: torch.Tensor,
    updates: Sequence[ExpertUpdate],
) -> torch.Tensor:
    """Weight ``name`` of every expert on its group of rows of ``x`` (grouped by expert, ``counts``
    rows each), plus its bias and its low-rank updates."""
    weight = getattr(module, name)
    bias = getattr(module, f"{name}_bias", None) if getattr(module, "has_bias", False) else None
    transposed = bool(module.is_transposed)
    parts: list[torch.Tensor] = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe = x[start : start + n]
        ye = xe @ weight[e] if transposed else F.linear(xe, weight[e])
        if bias is not None:
            ye = ye + bias[e]
        for u in updates:
            A, B = u.A[e], u.B[e]
            d = F.linear(F.linear(u.dropout(xe).to(A.dtype), A), B) * u.scale
            if u.rows is not None:
                d = d * u.rows[token_of[start : start + n]].unsqueeze(-1).to(d.dtype)
            ye = ye + d.to(ye.dtype)
        parts.append(ye)
        start += n
    if not parts:
        out = weight.shape[-1] if transposed else weight.shape[-2]
        return x.new_zeros(0, out)
    return torch.cat(parts)


def expert_delta(A: torch.Tensor, B: torch.Tensor, scale: float, transposed: bool) -> torch.Tensor:
    """The dense update ``scale · B_e A_e`` of every expert, in the weight's layout: ``(experts,
    out, in)``, or ``(experts, in, out)`` when ``transposed`` (for merging, never in the forward)."""
    delta = torch.bmm(B, A) * scale
    return delta.transpose(1, 2) if transposed else delta
