"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024), arXiv:2402.09353.

    W' = m ⊙ (W0 + s · B A) / ‖W0 + s · B A‖,    y = W' x + b

with the norm taken per output row of the ``(out, in)`` weight (PEFT's convention), ``m`` (out,)
trainable and initialised to the row norms ``‖W0‖``, and the norm treated as a constant in the
backward pass (the paper's section 4.3; PEFT's ``weight_norm.detach()``). A and B are LoRA's, with
LoRA's fields and initialisers (B = 0, so W' = W0 at init). The layer computes the module's output
itself from one low-rank forward (the fused kernel of :mod:`deltatune.kernels.lowrank` where it applies):

    y0 = W0 x + b + s · B A x,    k = m / ‖W0 + s B A‖,    y = y0 + (k − 1) ⊙ (y0 − b)

which is PEFT's ``result + (k − 1) ⊙ base_result + k ⊙ s · lora(x)``. The row norms never form
``B A``: ‖W0 + sBA‖² = ‖W0‖² + 2s·rowsum(B ⊙ W0Aᵀ) + s²·rowsum(B AAᵀ ⊙ B). With dropout active
(training) the update reads the dropped-out input, as in PEFT.

Closed forms, per adapted ``nn.Linear`` (in_features, out_features):

    trainable = r · (in + out) + out        stored bytes = 4 · trainable   (float32 tensors)

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deltatune import inject
    >>> from deltatune.methods.lowrank.dora import DoRA
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> att = inject(net, DoRA(rank=4), targets=["0"])
    >>> att.closed_form("default")
    (144, 576)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..._cache import Memo
from ...contract import ReplacingLayer, Suite, dropout_module, merged_linear, register
from ...contract.fields import Instance, param
from ...kernels.lowrank import compute_dtype, fusable, lowrank_delta, lowrank_linear
from ...targets import module_kind, shape_of
from .base import Gaussian, KaimingUniform, LoRAInit, ScaledLowRank, adapter_dtype


@register
@dataclass(frozen=True, kw_only=True)
class DoRA(ScaledLowRank):
    """LoRA's direction update with a learned per-row magnitude.

    Fields (paper defaults in brackets):
        rank, alpha, dropout, rank_stabilized: as LoRA's (:class:`deltatune.methods.lowrank.lora.LoRA`).
        init: initialiser of A and B, KaimingUniform() or Gaussian() [KaimingUniform()].
    """

    init: LoRAInit = param(KaimingUniform(), Instance((KaimingUniform, Gaussian)), "initialiser of A and B")  # noqa: RUF009 - a frozen, immutable default

    name: ClassVar[str] = "dora"

    def default_lr(self) -> float:
        """3e-3, chosen on SST-2's validation split (MiniLM, query/value, 150 steps: benchmarks/README.md,
        "Each method at its own learning rate"): 82.8 at r = 8, against 81.2 at 1e-3. At r = 4 the grid
        chose 9e-3 (84.2 against 82.3 at 3e-3, one seed): a lower rank takes a higher rate; give ``--lr``
        there."""
        return 3e-3

    weight_space: ClassVar[bool] = False  # the update is not additive in W: merged(base), not delta_weight
    supports_mixed_batch: ClassVar[bool] = False  # computes the module's output itself
    quantized_base: ClassVar[bool] = False  # its magnitude is a norm of the float weight
    layer_types: ClassVar[tuple[str, ...]] = ("linear",)
    suite: ClassVar[Suite] = Suite(
        example={"rank": 4}, variants={"gaussian": {"fields": {"rank": 2, "init": {"type": "gaussian"}}}}
    )

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> DoRALayer:
        if type(base) is not nn.Linear:
            kind = module_kind(base) or type(base).__name__
            raise ValueError(
                f"DoRA: {path!r} is {type(base).__name__} ({kind}); DoRA adapts only nn.Linear modules"
            )
        layer = DoRALayer(self, base.in_features, base.out_features, adapter_dtype(base))
        self.init.initialise(layer.lora_A.data, layer.lora_B.data, kind="linear", generator=generator)
        layer.to(device=base.weight.device)  # (the norm reads W0 where it lives: a GPU, or meta)
        with torch.no_grad():
            layer.magnitude.copy_(layer.row_norm(base.weight))  # = ‖W0‖, computed as forward does
        return layer

    def parameter_count(self, base: nn.Module) -> int:
        return self.factor_count(base) + shape_of(base)[1]

    def stored_bytes(self, base: nn.Module) -> int:
        return self.parameter_count(base) * adapter_dtype(base).itemsize


class DoRALayer(ReplacingLayer):
    """DoRA's tensors for one ``nn.Linear``; it computes the module's output (a replacing layer)."""

    def __init__(self, config: DoRA, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.zeros(config.rank, in_features, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank, dtype=dtype))  # (out, r)
        self.magnitude = nn.Parameter(torch.ones(out_features, dtype=dtype))  # m, (out,)
        self.dropout = dropout_module(config.dropout)
        self._norm: Memo[torch.Tensor] = Memo()
        self._base_sq: Memo[torch.Tensor] = Memo()

    def row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W0 + s B A‖ per output row, a constant for autograd (cached while W0, A, B are unchanged)."""
        A, B = self.lora_A, self.lora_B
        cached = self._norm.get(weight, A, B)
        if cached is not None:
            return cached
        with torch.no_grad():
            W = weight.detach().to(A.dtype)
            s = self.scale
            sq = self._base_sq.get(weight)  # ‖W0‖² per row: W0 is frozen, A and B change every step
            if sq is None:
                sq = self._base_sq.put(W.square().sum(1), weight)
            sq = sq + (2 * s) * (B * (W @ A.t())).sum(1) + (s * s) * ((B @ (A @ A.t())) * B).sum(1)
            norm = sq.clamp_min(0).sqrt().clamp_min(torch.finfo(A.dtype).tiny)
        return self._norm.put(norm, weight, A, B)

    def magnitude_scale(self, base: nn.Linear) -> torch.Tensor:
        """k = m / ‖W0 + s B A‖ (the norm detached)."""
        return self.magnitude / self.row_norm(base.weight)

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        x: torch.Tensor = args[0]
        assert isinstance(base, nn.Linear)
        k = self.magnitude_scale(base)
        A, B = self.lora_A, self.lora_B
        dtype = compute_dtype(x, A)  # (the precision policy, lowrank.py: x's dtype by default)
        if self.training and not isinstance(self.dropout, nn.Identity):
            # PEFT: base(x) + (k − 1) ⊙ W0 xd + k ⊙ s B A xd with xd = dropout(x).
            xd = self.dropout(x)
            base_out: torch.Tensor = base(x)
            w0x = F.linear(xd, base.weight).to(dtype)
            lora = F.linear(F.linear(xd.to(dtype), A.to(dtype)) * self.scale, B.to(dtype))
            kd = k.to(dtype)
            return base_out + ((kd - 1) * w0x + kd * lora).to(base_out.dtype)
        if fusable(base, x) and A.dtype == x.dtype:
            # y = k ⊙ (W0 x + s B A x) + b: one fused GEMM without the bias, one pass for k and b.
            # (float32 only: in bf16 the bias added apart rounds otherwise than base(x), and the
            # model would not equal the base at init.)
            centred_out = lowrank_linear(base, x, A, B, self.scale, bias=False)
            if base.bias is None:
                return centred_out * k
            out: torch.Tensor = torch.addcmul(base.bias, centred_out, k)
            return out
        y0: torch.Tensor = base(x)
        y = y0 + lowrank_delta(x, A, B, self.scale).to(y0.dtype)
        centred = y if base.bias is None else y - base.bias
        return y + ((k.to(y.dtype) - 1) * centred)

    def merged(self, base: nn.Module) -> nn.Module:
        """A plain Linear with weight W' = k ⊙ (W0 + s B A)."""
        assert isinstance(base, nn.Linear)
        with torch.no_grad():
            W = base.weight.detach().to(self.lora_A.dtype)
            new = self.magnitude_scale(base)[:, None] * (W + self.scale * (self.lora_B @ self.lora_A))
            out: nn.Module = merged_linear(base, new - W)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scale={self.scale:g}"
