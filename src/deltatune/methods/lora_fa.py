"""LoRA-FA: memory-efficient LoRA with a frozen down-projection (Zhang et al. 2023, arXiv:2308.03303).

    y = W0 x + s · B (A dropout(x)),    A: (r, in) frozen at its random init,  B: (out, r) trained from 0

Only B trains, so the backward pass needs ``h = A x`` (r values per token) for B's gradient and
never the adapter's in-wide input ``x``: with A a buffer (no gradient), autograd saves ``h``, not
``x``, in the fused kernel of :mod:`deltatune.lowrank` (which keeps ``x`` only for a trainable A) as
in the plain form. Dropout on the adapter input (off by default) saves its in-wide mask, as in any
LoRA.

A is drawn like LoRA's (Kaiming-uniform, from the per-module seed) and *stored* in the adapter file
next to B, so that a saved adapter loads without the seed that made it (regenerating A from the
recorded seed would halve the file but tie loading to the seed and the RNG). PEFT has no LoRA-FA.

Closed forms, per adapted Linear/Conv1D with (in, out) = (in_features, out_features):

    trainable = r · out        stored bytes = 4 · r · (in + out)   (float32 A and B)

Example:
    >>> from torch import nn
    >>> from deltatune import inject
    >>> from deltatune.methods.lora_fa import LoRAFA
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> att = inject(net, LoRAFA(rank=4, alpha=8), targets=["0"])
    >>> att.closed_form("default")
    (64, 512)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import check, register
from ..fields import Bool, Float, Int, param
from ..targets import module_kind, shape_of
from .lora import KaimingUniform, LoRA, LoRALayer, adapter_dtype


@register
@dataclass(frozen=True, kw_only=True)
class LoRAFA:
    """LoRA with A frozen at its random initialisation; only B trains.

    Fields (paper defaults in brackets):
        rank: r, the rank of the update [8].
        alpha: scaling numerator; the update is scaled by alpha/r [8, as LoRA].
        dropout: dropout on the adapter's input [0.0].
        rank_stabilized: rsLoRA scaling alpha/sqrt(r) instead of alpha/r [False].
    """

    rank: int = param(8, Int(min=1), "rank r of the update B A")
    alpha: float = param(8.0, Float(low=0.0, low_open=True), "scale numerator: update is (alpha/r) B A")
    dropout: float = param(0.0, Float(0.0, 1.0, high_open=True), "dropout probability on the adapter input")
    rank_stabilized: bool = param(False, Bool(), "rsLoRA: scale by alpha/sqrt(r) instead of alpha/r")

    name: ClassVar[str] = "lora_fa"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    weight_space: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    quantized_base: ClassVar[bool] = True  # only adds to the base output
    combinable: ClassVar[bool] = False
    # Not embeddings: LoRA's embedding init is A = 0, which frozen would never learn.
    layer_types: ClassVar[tuple[str, ...]] = ("linear", "conv1d")
    small_example: ClassVar[dict[str, Any]] = {"rank": 4}

    def __post_init__(self) -> None:
        check(self)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rank_stabilized else self.rank)

    def as_lora(self) -> LoRA:
        """The LoRA configuration with the same factors and scale (what the layer is built from)."""
        return LoRA(
            rank=self.rank, alpha=self.alpha, dropout=self.dropout, rank_stabilized=self.rank_stabilized
        )

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> LoRAFALayer:
        kind = module_kind(base)
        if kind not in self.layer_types:
            raise ValueError(f"LoRAFA: {path!r} is {type(base).__name__}, not a linear/Conv1D module")
        in_features, out_features = shape_of(base)
        layer = LoRAFALayer(self.as_lora(), kind, in_features, out_features, adapter_dtype(base), base)
        KaimingUniform().initialise(layer.lora_A, layer.lora_B.data, kind=kind, generator=generator)
        return layer

    def parameter_count(self, base: nn.Module) -> int:
        return self.rank * shape_of(base)[1]

    def stored_bytes(self, base: nn.Module) -> int:
        in_features, out_features = shape_of(base)
        return self.rank * (in_features + out_features) * adapter_dtype(base).itemsize


class LoRAFALayer(LoRALayer):
    """A LoRA layer whose ``lora_A`` is a saved buffer, not a parameter (so it never trains)."""

    def __init__(
        self,
        config: LoRA,
        kind: str,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        base: nn.Module | None,
    ) -> None:
        super().__init__(config, kind, in_features, out_features, dtype, base)
        frozen = self.lora_A.detach()
        del self.lora_A
        self.register_buffer("lora_A", frozen)  # (r, in), persistent: saved with B
