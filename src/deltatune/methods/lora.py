"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021), arXiv:2106.09685.

    y = W0 x + s · B A dropout(x),    A: (r, in),  B: (out, r),  s = alpha / r

rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) uses s = alpha / sqrt(r) so that the update's scale does
not shrink as the rank grows. A starts Kaiming-uniform and B at zero (so the model equals the base at
init); on embeddings the roles swap (A zero, B standard normal), as in the reference code and PEFT.

Closed forms, per adapted module with (in, out) = (in_features, out_features), or
(num_embeddings, embedding_dim) for an embedding:

    trainable = stored = r · (in + out)        stored bytes = 4 · r · (in + out)   (float32 factors)

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deltatune import LoRA, inject
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> att = inject(net, LoRA(rank=4, alpha=8), targets=["0"])
    >>> att.closed_form("default")
    (128, 512)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import check, register
from ..fields import Bool, Float, Instance, Int, component, param
from ..targets import module_kind, shape_of


class LoRAInit:
    """An initialiser of LoRA factors. Subclasses are frozen dataclasses registered as components."""

    def initialise(
        self, A: torch.Tensor, B: torch.Tensor, *, kind: str, generator: torch.Generator
    ) -> None:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement initialise()")


def _embedding_init(A: torch.Tensor, B: torch.Tensor, generator: torch.Generator) -> None:
    # On embeddings the roles swap (reference code and PEFT): A = 0, B ~ N(0, 1).
    A.zero_()
    B.normal_(0.0, 1.0, generator=generator)


@component("kaiming_uniform")
@dataclass(frozen=True)
class KaimingUniform(LoRAInit):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's Linear init, ``kaiming_uniform_(a=sqrt(5))``), B = 0."""

    def initialise(self, A: torch.Tensor, B: torch.Tensor, *, kind: str, generator: torch.Generator) -> None:
        if kind == "embedding":
            _embedding_init(A, B, generator)
            return
        bound = 1.0 / math.sqrt(A.shape[1])
        A.uniform_(-bound, bound, generator=generator)
        B.zero_()


@component("gaussian")
@dataclass(frozen=True)
class Gaussian(LoRAInit):
    """A ~ N(0, 1/r), B = 0 (PEFT's ``init_lora_weights="gaussian"``)."""

    def initialise(self, A: torch.Tensor, B: torch.Tensor, *, kind: str, generator: torch.Generator) -> None:
        if kind == "embedding":
            _embedding_init(A, B, generator)
            return
        A.normal_(0.0, 1.0 / A.shape[0], generator=generator)
        B.zero_()


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters train in float32 on a bf16/fp16 base, and in float64 on a float64 base."""
    weight = base.weight
    dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
    return torch.promote_types(dtype, torch.float32)


@register
@dataclass(frozen=True, kw_only=True)
class LoRA:
    """Low-rank update of a weight.

    Fields (paper defaults in brackets):
        rank: r, the rank of the update [8; the paper finds r = 1..8 enough on GPT-3].
        alpha: scaling numerator; the update is scaled by alpha/r [8, as PEFT].
        dropout: dropout on the adapter's input [0.0; the paper uses 0.1 on some GLUE tasks].
        rank_stabilized: rsLoRA scaling alpha/sqrt(r) instead of alpha/r [False].
        init: initialiser of A and B [KaimingUniform()].
    """

    rank: int = param(8, Int(min=1), "rank r of the update B A")
    alpha: float = param(8.0, Float(low=0.0, low_open=True), "scale numerator: update is (alpha/r) B A")
    dropout: float = param(0.0, Float(0.0, 1.0, high_open=True), "dropout probability on the adapter input")
    rank_stabilized: bool = param(False, Bool(), "rsLoRA: scale by alpha/sqrt(r) instead of alpha/r")
    init: LoRAInit = param(KaimingUniform(), Instance((LoRAInit,)), "initialiser of A and B")  # noqa: RUF009 - a frozen, immutable default

    name: ClassVar[str] = "lora"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    weight_space: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    combinable: ClassVar[bool] = True
    layer_types: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "embedding")
    small_example: ClassVar[dict[str, Any]] = {"rank": 4}

    def __post_init__(self) -> None:
        check(self)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rank_stabilized else self.rank)

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> LoRALayer:
        kind = module_kind(base)
        if kind is None:
            raise ValueError(f"LoRA: {path!r} is {type(base).__name__}, not a linear/Conv1D/embedding module")
        in_features, out_features = shape_of(base)
        layer = LoRALayer(self, kind, in_features, out_features, adapter_dtype(base), base)
        self.init.initialise(layer.lora_A.data, layer.lora_B.data, kind=kind, generator=generator)
        return layer

    def parameter_count(self, base: nn.Module) -> int:
        in_features, out_features = shape_of(base)
        return self.rank * (in_features + out_features)

    def stored_bytes(self, base: nn.Module) -> int:
        return self.parameter_count(base) * adapter_dtype(base).itemsize

    @classmethod
    def combine_layers(cls, parts: list[tuple[nn.Module, float]]) -> tuple[LoRA, LoRALayer]:
        """Exact weighted sum: sum_i w_i s_i B_i A_i = [w_1 s_1 B_1 | ...] [A_1; ...] with scale 1."""
        layers: list[LoRALayer] = []
        for part, _ in parts:
            if not isinstance(part, LoRALayer):
                raise ValueError(
                    f"LoRA.combine_layers: every part must be a LoRA layer, got {type(part).__name__}"
                )
            layers.append(part)
        first = layers[0]
        rank = sum(int(layer.lora_A.shape[0]) for layer in layers)
        config = cls(rank=rank, alpha=float(rank), dropout=first.config.dropout)
        out = LoRALayer(
            config,
            first.kind,
            int(first.lora_A.shape[1]),
            int(first.lora_B.shape[0]),
            first.lora_A.dtype,
            None,
            first.embedding_kwargs,
        )
        with torch.no_grad():
            out.lora_A.copy_(torch.cat([layer.lora_A for layer in layers], dim=0))
            out.lora_B.copy_(
                torch.cat(
                    [w * layer.scale * layer.lora_B for layer, (_, w) in zip(layers, parts, strict=True)],
                    dim=1,
                )
            )
        out.to(first.lora_A.device)
        return config, out


class LoRALayer(nn.Module):
    """The trainable part of one LoRA-adapted module; the base module is passed in, never owned."""

    additive: ClassVar[bool] = True

    def __init__(
        self,
        config: LoRA,
        kind: str,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        base: nn.Module | None,
        embedding_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.kind = kind
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.zeros(config.rank, in_features, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank, dtype=dtype))  # (out, r)
        self.dropout: nn.Module = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if embedding_kwargs is None and isinstance(base, nn.Embedding):
            embedding_kwargs = {
                "padding_idx": base.padding_idx,
                "max_norm": base.max_norm,
                "norm_type": base.norm_type,
                "scale_grad_by_freq": base.scale_grad_by_freq,
                "sparse": base.sparse,
            }
        self.embedding_kwargs = embedding_kwargs or {}

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A x for the adapter's input ``x`` (token ids for an embedding)."""
        if self.kind == "embedding":
            h = F.embedding(x, self.lora_A.t(), **self.embedding_kwargs)  # (..., r)
        else:
            h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (..., r)
        # Scaling the rank-r activations is cheaper than scaling the (..., out) result.
        return F.linear(h * self.scale, self.lora_B)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """s · B A in the layout of the base weight: (out, in) for Linear, transposed otherwise."""
        delta = (self.lora_B @ self.lora_A) * self.scale  # (out, in)
        return delta if self.kind == "linear" else delta.t()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.lora_A.shape[0]}, scale={self.scale:g}"
