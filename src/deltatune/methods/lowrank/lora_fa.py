"""LoRA-FA: memory-efficient LoRA with a frozen down-projection (Zhang et al. 2023, arXiv:2308.03303).

    y = W0 x + s · B (A dropout(x)),    A: (r, in) frozen at its random init,  B: (out, r) trained from 0

Only B trains, so the backward pass needs ``h = A x`` (r values per token) for B's gradient and
never the adapter's in-wide input ``x``: with A a buffer (no gradient), autograd saves ``h``, not
``x``, in the fused kernel of :mod:`deltatune.kernels.lowrank` (which keeps ``x`` only for a trainable A) as
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
    >>> from deltatune.methods.lowrank.lora_fa import LoRAFA
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> att = inject(net, LoRAFA(rank=4, alpha=8), targets=["0"])
    >>> att.closed_form("default")
    (64, 512)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...contract import Suite, register
from ...targets import shape_of
from .base import KaimingUniform, ScaledLowRank, adapter_dtype, linear_like
from .lora import LoRALayer, lora_of


@register
@dataclass(frozen=True, kw_only=True)
class LoRAFA(ScaledLowRank):
    """LoRA with A frozen at its random initialisation; only B trains.

    Fields (paper defaults in brackets):
        rank: r, the rank of the update [8].
        alpha: scaling numerator; the update is scaled by alpha/r [8, as LoRA].
        dropout: dropout on the adapter's input [0.0].
        rank_stabilized: rsLoRA scaling alpha/sqrt(r) instead of alpha/r [False].
    """

    name: ClassVar[str] = "lora_fa"

    def default_lr(self) -> float:
        """1e-2: with A frozen only B moves, so the update needs a larger step than LoRA's; chosen on SST-2's
        validation split (MiniLM, query/value, 150 steps: benchmarks/README.md, "Each method at its own
        learning rate"): 79.9 at 1e-2, 75.9 at 1e-3, 78.2 at 3e-2."""
        return 1e-2

    # (Not embeddings, the base's layer types: LoRA's embedding init is A = 0, which frozen would
    # never learn.)
    suite: ClassVar[Suite] = Suite(example={"rank": 4})

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> LoRAFALayer:
        kind, in_features, out_features = linear_like(base, path, "LoRAFA", self.layer_types)
        layer = LoRAFALayer(lora_of(self), kind, in_features, out_features, adapter_dtype(base), base)
        KaimingUniform().initialise(layer.lora_A, layer.lora_B.data, kind=kind, generator=generator)
        return layer

    def parameter_count(self, base: nn.Module) -> int:
        return self.rank * shape_of(base)[1]

    def stored_bytes(self, base: nn.Module) -> int:
        return self.factor_count(base) * adapter_dtype(base).itemsize


class LoRAFALayer(LoRALayer):
    """A LoRA layer whose ``lora_A`` is a saved buffer, not a parameter (so it never trains)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # (LoRALayer's arguments)
        super().__init__(*args, **kwargs)
        frozen = self.lora_A.detach()
        del self.lora_A
        self.register_buffer("lora_A", frozen)  # (r, in), persistent: saved with B
