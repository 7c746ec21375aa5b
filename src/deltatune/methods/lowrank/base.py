"""The low-rank base: what LoRA and every low-rank relative share.

A low-rank method's update of a module with weight ``W`` (``(out, in)``) is ``s · B A``, ``A`` of shape
``(r, in)`` and ``B`` of shape ``(out, r)``; the methods differ in how ``A``, ``B`` and ``s`` are made
(trained, shared, tied, drawn from a bank, masked). Here, declared once:

* the fields: :class:`LowRank` (``rank``, ``dropout``) and :class:`ScaledLowRank` (adds ``alpha`` and
  ``rank_stabilized``, and the ``scale`` they give: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
  A method that wants other defaults says so in its class line:
  ``class VeRA(LowRank, defaults={"rank": 256})``;
* the layer: :class:`deltatune.contract.LowRankLayer` (give ``factors()``, inherit ``delta``,
  ``delta_weight`` and ``lowrank_factors``, the fused kernel's input);
* :func:`adapter_dtype` and :func:`linear_like` (the adapted module's kind and shape, or a refusal);
* the standard initialisers of ``A`` and ``B``: :class:`KaimingUniform` (LoRA's) and :class:`Gaussian`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...contract import Method
from ...contract.fields import Bool, Float, Int, component, param
from ...targets import expert_weights, module_kind, shape_of


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters train in float32 on a bf16/fp16 base, and in float64 on a float64 base."""
    experts = expert_weights(base)
    weight = base._parameters[experts[0]] if experts else base.weight
    dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
    return torch.promote_types(dtype, torch.float32)


def linear_like(base: nn.Module, path: str, who: str, kinds: tuple[str, ...]) -> tuple[str, int, int]:
    """``(kind, in_features, out_features)`` of the module at ``path``, or a ``ValueError`` saying
    that ``who`` adapts only ``kinds``."""
    kind = module_kind(base)
    if kind not in kinds:
        raise ValueError(f"{who}: {path!r} is {type(base).__name__}, not a {'/'.join(kinds)} module")
    in_features, out_features = shape_of(base)
    return kind, in_features, out_features


@dataclass(frozen=True, kw_only=True)
class LowRank(Method):
    """A method whose update is ``s · B A`` of rank ``rank``, with dropout on the adapter's input."""

    rank: int = param(8, Int(min=1), "rank r of the update B A")
    dropout: float = param(0.0, Float(0.0, 1.0, high_open=True), "dropout probability on the adapter input")

    # What a low-rank update is, unless a method says otherwise: it folds into the weight, is zero at
    # init (B = 0), adds to the weight (so to a 4-bit base's output too), and serves per example.
    mergeable = True
    identity_at_init = True
    weight_space = True
    supports_mixed_batch = True
    quantized_base = True
    layer_types: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def __init_subclass__(cls, defaults: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """``defaults``: other default values of inherited fields for this method (the field, its
        constraint and its help stay the base's)."""
        super().__init_subclass__(**kwargs)
        if not defaults:
            return
        own = cls.__dict__.get("__annotations__")  # noqa: RUF063 - mutated below, not read
        if own is None:
            own = {}
            cls.__annotations__ = own
        for name, value in defaults.items():
            inherited = cls.__dataclass_fields__.get(name)  # (the base's, before @dataclass runs)
            if inherited is None:
                raise TypeError(f"{cls.__name__}: defaults names {name!r}, which is not an inherited field")
            own[name] = inherited.type
            setattr(cls, name, dataclasses.field(default=value, metadata=inherited.metadata))

    def factor_count(self, base: nn.Module) -> int:
        """``r · (in + out)``: the entries of ``A`` and ``B`` for one module."""
        in_features, out_features = shape_of(base)
        return self.rank * (in_features + out_features)


@dataclass(frozen=True, kw_only=True)
class ScaledLowRank(LowRank):
    """A low-rank method scaled by ``alpha / r`` (or ``alpha / sqrt(r)``: rsLoRA, Kalajdzievski 2023)."""

    alpha: float = param(8.0, Float(low=0.0, low_open=True), "scale numerator: update is (alpha/r) B A")
    rank_stabilized: bool = param(False, Bool(), "rsLoRA: scale by alpha/sqrt(r) instead of alpha/r")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rank_stabilized else self.rank)


class LoRAInit:
    """An initialiser of LoRA factors. Subclasses are frozen dataclasses registered as components;
    a random one gives ``draw_a`` (B starts at zero), one taken from the weight gives ``from_weight``."""

    def initialise(self, A: torch.Tensor, B: torch.Tensor, *, kind: str, generator: torch.Generator) -> None:
        """A by :meth:`draw_a` and B = 0; on embeddings the roles swap (reference code and PEFT):
        A = 0, B ~ N(0, 1)."""
        if kind == "embedding":
            A.zero_()
            B.normal_(0.0, 1.0, generator=generator)
            return
        self.draw_a(A, generator)
        B.zero_()

    def draw_a(self, A: torch.Tensor, generator: torch.Generator) -> None:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement draw_a() or initialise()")


@component("kaiming_uniform")
@dataclass(frozen=True)
class KaimingUniform(LoRAInit):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's Linear init, ``kaiming_uniform_(a=sqrt(5))``), B = 0."""

    def draw_a(self, A: torch.Tensor, generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(A.shape[1])
        A.uniform_(-bound, bound, generator=generator)


@component("gaussian")
@dataclass(frozen=True)
class Gaussian(LoRAInit):
    """A ~ N(0, 1/r), B = 0 (PEFT's ``init_lora_weights="gaussian"``)."""

    def draw_a(self, A: torch.Tensor, generator: torch.Generator) -> None:
        A.normal_(0.0, 1.0 / A.shape[0], generator=generator)


def restart_factors(A: torch.Tensor, B: torch.Tensor, *, kind: str, seed: int) -> None:
    """Set ``A`` and ``B`` in place to a fresh :class:`KaimingUniform` start drawn from ``seed``
    (A random, B = 0): the restart of ReLoRA and of LoRA-drop's factors."""
    generator = torch.Generator().manual_seed(seed)
    fresh_A = torch.empty(A.shape, dtype=A.dtype)
    fresh_B = torch.empty(B.shape, dtype=B.dtype)
    KaimingUniform().initialise(fresh_A, fresh_B, kind=kind, generator=generator)
    with torch.no_grad():
        A.copy_(fresh_A)
        B.copy_(fresh_B)
