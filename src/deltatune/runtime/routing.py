"""Per-example adapters in one batch (:func:`deltatune.route`): the row table of a block, and the
batched low-rank product that serves every row's own adapter at once.

The wrapper (:class:`deltatune.runtime.wrapper.Adapted`) asks :func:`batched_factors` which of a module's
adapters one product can serve (two or more whose update is ``s · B A x``), and :func:`add_batched`
adds each row's update to the base output: every adapter's factors stacked (ranks zero-padded, the
scale folded into B, a slot of zeros for rows of the base or of another adapter), each row's factors
gathered by the block's slot table, then ``bmm`` and ``baddbmm_`` — the gathered-factor matmul of
punica and S-LoRA. The activations are neither copied nor gathered. The other adapters (DoRA,
bottleneck adapters, ...) gather their rows one adapter at a time in the wrapper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._cache import Memo
from ..contract import LowRankLayer
from ..kernels.lowrank import compute_dtype


class Routing:
    """The per-example adapter table of one :func:`deltatune.route` block: built once, shared by every
    wrapper (the row indices go to each device once per block, not once per wrapper and forward)."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
        self.rows: dict[str, list[int]] = {}  # adapter -> the rows (examples) that use it
        for i, name in enumerate(self.names):
            if name is not None:
                self.rows.setdefault(name, []).append(i)
        self._indices: dict[tuple[Any, torch.device], torch.Tensor] = {}
        self._memos: dict[int, Memo[Any]] = {}  # id(wrapper) -> its stacked factors (serving)

    def __len__(self) -> int:
        return len(self.names)

    def covers_all(self, name: str) -> bool:
        """Whether every row uses adapter ``name`` (then no gather is needed)."""
        return len(self.rows[name]) == len(self.names)

    def indices(self, name: str, device: torch.device) -> torch.Tensor:
        """The rows of adapter ``name`` as a long tensor on ``device`` (made once per device)."""
        return self._table(name, device, lambda: self.rows[name])

    def slots(self, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """For each row, the position of its adapter in ``names``, or ``len(names)`` for a row whose
        adapter is not among them (a long tensor on ``device``, made once per device and tuple)."""
        where: dict[str | None, int] = {n: i for i, n in enumerate(names)}
        return self._table(names, device, lambda: [where.get(n, len(names)) for n in self.names])

    def memo(self, owner: nn.Module) -> Memo[Any]:
        """A cache for ``owner`` (a wrapper) that lives as long as this block."""
        return self._memos.setdefault(id(owner), Memo())

    def _table(self, key: Any, device: torch.device, make: Any) -> torch.Tensor:
        found = self._indices.get((key, device))
        if found is None:
            found = torch.tensor(make(), dtype=torch.long).to(device)
            self._indices[(key, device)] = found
        return found


def batched_factors(
    routing: Routing, layers: Mapping[str, nn.Module], x: Any
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None:
    """The low-rank adapters (update ``s · B A x``) among ``layers`` that one batched product serves
    (:func:`add_batched`), or None where the per-adapter gather serves them better: fewer than two of
    them, or, under autograd (where the stacked factors are rebuilt on every call), fewer tokens per
    example than the largest rank (a decoding step)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        return None
    if any(routing.covers_all(name) for name in layers):
        return None
    # Decided before any factor is built: a layer's factors may be built per call (VB-LoRA's from its
    # bank, under autograd), and those of a module that ends up on the per-adapter path are not used.
    candidates = {n: layer for n, layer in layers.items() if isinstance(layer, LowRankLayer)}
    if len(candidates) < 2:
        return None
    found: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, layer in candidates.items():
        parts = layer.lowrank_factors()
        if parts is not None and compute_dtype(x, parts[0]) == x.dtype:
            found[name] = parts
    if len(found) < 2:
        return None
    rank = max(A.shape[0] for A, _, _ in found.values())
    if torch.is_grad_enabled() and x[0].numel() // x.shape[-1] < rank:
        return None
    return found


def _stacked(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every adapter's A ``(n + 1, r, in)`` and ``(s B)ᵀ`` ``(n + 1, r, out)`` in ``dtype``, ranks
    zero-padded to the largest, and a last slot of zeros (a row of the base or of another adapter)."""
    rank = max(A.shape[0] for A, _, _ in factors.values())
    As = [F.pad(A.to(dtype), (0, 0, 0, rank - A.shape[0])) for A, _, _ in factors.values()]
    Bs = [F.pad((B.to(dtype) * s).t(), (0, 0, 0, rank - B.shape[1])) for _, B, s in factors.values()]
    As.append(torch.zeros_like(As[0]))
    Bs.append(torch.zeros_like(Bs[0]))
    return torch.stack(As), torch.stack(Bs)


def add_batched(
    out: torch.Tensor,
    x: torch.Tensor,
    routing: Routing,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    in_place: bool,
    owner: nn.Module,
) -> torch.Tensor:
    """``out`` plus each row's own low-rank update, in two batched products for every adapter at once
    (the gathered-factor matmul of punica and S-LoRA): row ``i`` gets the factors of its adapter from
    the stacks of :func:`_stacked`, gathered by one row table that the block builds once; ``x`` is
    neither copied nor gathered, and when serving the update accumulates into ``out`` inside the GEMM.
    Without autograd the stacks are kept for the rest of the block (``owner``'s entry in the routing),
    valid while the factors are unchanged: a block that serves many forwards (a generation loop)
    builds them once."""
    dtype = x.dtype
    names = tuple(factors)
    scales = tuple(s for _, _, s in factors.values())
    sources = [t for A, B, _ in factors.values() for t in (A, B)]
    memo = routing.memo(owner) if not torch.is_grad_enabled() else None
    cached = memo.get(*sources) if memo is not None else None
    if cached is not None and cached[0] == (names, dtype, scales):
        A_stack, Bt_stack = cached[1], cached[2]
    else:
        A_stack, Bt_stack = _stacked(factors, dtype)
        if memo is not None:
            memo.put(((names, dtype, scales), A_stack, Bt_stack), *sources)
    slots = routing.slots(names, x.device)
    A_rows = A_stack.index_select(0, slots)  # (batch, r, in)
    Bt_rows = Bt_stack.index_select(0, slots)  # (batch, r, out)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, in)
    h = torch.bmm(x3, A_rows.transpose(1, 2))  # (batch, tokens, r)
    if in_place and out.dtype == dtype and out.is_contiguous():
        out.view(x3.shape[0], x3.shape[1], -1).baddbmm_(h, Bt_rows)
        return out
    delta = torch.bmm(h, Bt_rows).view(*out.shape)
    return out + delta.to(out.dtype)
