"""Partial fine-tuning: train only the last N transformer blocks (the "tune the top layers" baseline,
e.g. Howard & Ruder 2018, arXiv:1801.06146; a specification method in Ding et al. 2022,
arXiv:2203.06904, §3.2).

    θ = (θ_frozen, θ_top),   only θ_top (the last N blocks) is updated;   merged: the trained blocks

Each target block is replaced, while the adapter is active, by a trainable copy of itself: the base
block stays untouched (so ``disabled()``, ``unload()`` and switching adapters work as for every other
method), and merging puts the trained copy in its place. The copy keeps float32 master weights on a
bf16/fp16 base and computes with them cast to the base's dtype, so at init it reproduces the base
bit for bit. The task head trains through ``modules_to_save`` (the harness adds it by default).

Closed forms, per adapted block with parameters P (each of dtype t):

    trainable = stored = Σ_P numel(P)          stored bytes = Σ_P numel(P) · size(promote(t, float32))

Example:
    >>> from collections import OrderedDict
    >>> from torch import nn
    >>> from deltatune import inject
    >>> low, top = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 2))
    >>> net = nn.Sequential(OrderedDict(low=low, top=top))
    >>> inject(net, Partial(blocks=1), targets=["top"]).closed_form("default")
    (10, 40)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ... import anatomy
from ...contract import Method, ReplacingLayer, Suite, Wrapped, register
from ...contract.fields import Int, param


def _master_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32) if p.is_floating_point() else p.dtype


@register
@dataclass(frozen=True, kw_only=True)
class Partial(Method):
    """Train a full copy of each of the last ``blocks`` blocks.

    Fields (defaults in brackets):
        blocks: N, how many of the last blocks train [2]. Default targets: the last N blocks found by
            :mod:`deltatune.anatomy`; explicit targets must name exactly N blocks.
    """

    blocks: int = param(2, Int(min=1), "how many of the last blocks train")

    name: ClassVar[str] = "partial"

    def default_lr(self) -> float:
        """1.5e-4: whole blocks train, and like full fine-tuning they take 1.5e-4; chosen on SST-2's
        validation split (MiniLM, last 2 blocks, 150 steps: benchmarks/README.md, "Each method at its own
        learning rate"): 82.8 at 1.5e-4, 80.9 at 5e-5, 81.8 at 5e-4."""
        return 1.5e-4

    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    layer_types: ClassVar[tuple[str, ...]] = ("block", "experts")
    suite: ClassVar[Suite] = Suite(
        example={"blocks": 2},
        random_init=False,  # the copy equals the base: the seed does not matter
    )

    def default_targets(self, model: nn.Module) -> list[str]:
        parts = anatomy.describe(model)
        if self.blocks > parts.num_layers:
            raise ValueError(
                f"Partial.blocks must be <= the {parts.num_layers} blocks of {type(model).__name__}, "
                f"got {self.blocks}"
            )
        return list(parts.blocks[-self.blocks :])

    def check_targets(self, model: nn.Module, paths: list[str]) -> None:
        if len(paths) != self.blocks:
            raise ValueError(
                f"Partial.blocks must equal the number of targeted blocks ({len(paths)}: {paths[:4]}), "
                f"got {self.blocks}: give no targets to train the last {self.blocks} blocks, or set blocks"
            )

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> BlockCopy:
        inner = [name for name, m in base.named_modules() if isinstance(m, Wrapped)]
        if inner:
            raise ValueError(
                f"Partial: {path!r} already contains adapted modules ({inner[:3]}); inject Partial "
                "before other adapters, or into other blocks"
            )
        return BlockCopy(base)

    def parameter_count(self, base: nn.Module) -> int:
        return sum(p.numel() for p in base.parameters())

    def stored_bytes(self, base: nn.Module) -> int:
        return sum(p.numel() * _master_dtype(p).itemsize for p in base.parameters())


class BlockCopy(ReplacingLayer):
    """A trainable copy of a block that runs instead of it (a replacing layer)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(base)
        self.dtypes = {name: p.dtype for name, p in base.named_parameters()}
        with torch.no_grad():
            for p in self.module.parameters():
                p.data = p.data.to(_master_dtype(p))
                p.requires_grad_(True)
        self.cast = any(_master_dtype(p) != p.dtype for p in base.parameters())

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.cast:
            return self.module(*args, **kwargs)
        # float32 master weights, computed in the base's dtype (exactly the base at init).
        params = {name: p.to(self.dtypes[name]) for name, p in self.module.named_parameters()}
        return torch.func.functional_call(self.module, params, args, kwargs)

    def export_state(self) -> dict[str, torch.Tensor]:
        """The trained weights only (buffers are the base's and are not stored)."""
        return {name: p.detach() for name, p in self.module.named_parameters()}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(state[name])

    def merged(self, base: nn.Module) -> nn.Module:
        out = copy.deepcopy(self.module)
        with torch.no_grad():
            for name, p in out.named_parameters():
                p.data = p.data.to(self.dtypes[name])
                p.requires_grad_(False)
        return out
