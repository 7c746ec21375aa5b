"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort, Asano; ICLR 2024),
arXiv:2310.11454.

    y = W0 x + Λ_b B Λ_d A dropout(x),    A: (r, in),  B: (out, r),  Λ_d = diag(d),  Λ_b = diag(b)

A and B are frozen random matrices shared by every adapted module of one adapter: one pair, sized
to the largest adapted dimensions, of which each module takes the slice it needs
(``A[:, :in]``, ``B[:out, :]``, as PEFT). They are drawn Kaiming-uniform (PEFT's
``_kaiming_init``: bound sqrt(6 / fan_in)) from a CPU ``torch.Generator`` seeded with
``projection_prng_key`` (A first, then B), so they are regenerated rather than saved, and are the
same as PEFT's for the same key. Per module only ``d`` (length r, starts at ``d_initial``) and
``b`` (length out, starts at 0, so the model starts as the base) are trained.

Closed forms, per adapted module with (in, out) = (in_features, out_features):

    trainable = r + out        stored bytes = 4 · (r + out)   (float32 vectors)

The shared pair is neither trainable nor stored, unless ``save_projection`` is set (then it adds
4 · r · (in_max + out_max) bytes, once per adapter; PEFT's files written with its default
``save_projection=True`` import this way, using the file's projections as they are).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deltatune import inject
    >>> from deltatune.methods.lowrank.vera import VeRA
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    >>> att = inject(net, VeRA(rank=4), targets=["0", "2"])
    >>> att.closed_form("default")  # (4 + 32) + (4 + 8) vectors; the shared pair is regenerated
    (48, 192)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...contract import LowRankLayer, Suite, register
from ...contract.fields import Bool, Float, Int, param
from ...kernels.lowrank import compute_dtype
from ...targets import module_kind, shape_of
from .base import LowRank, adapter_dtype, linear_like

_KINDS = ("linear", "conv1d")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA init: U(−b, b) with b = sqrt(3) · sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(rank: int, in_max: int, out_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (A, B) that ``key`` gives, as PEFT draws them: A (r, in_max), then B (out_max, r)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    A = kaiming_uniform((rank, in_max), generator)
    B = kaiming_uniform((out_max, rank), generator)
    return A, B


def _largest(bases: Mapping[str, nn.Module]) -> tuple[int, int]:
    """(largest in_features, largest out_features) of the modules VeRA adapts."""
    shapes = [shape_of(b) for b in bases.values() if module_kind(b) in _KINDS]
    if not shapes:
        raise ValueError("VeRA: none of the targeted modules is a linear or Conv1D module")
    return max(i for i, _ in shapes), max(o for _, o in shapes)


def _dtype(bases: Mapping[str, nn.Module]) -> torch.dtype:
    dtype = torch.float32
    for base in bases.values():
        dtype = torch.promote_types(dtype, adapter_dtype(base))
    return dtype


class Projections(nn.Module):
    """The frozen random pair of one adapter, shared by all its layers (buffers, never trained).

    The buffers are in the saved state only when ``save_projection`` is set; otherwise they are
    regenerated from ``projection_prng_key`` by every inject and load."""

    vera_A: torch.Tensor  # noqa: N815 - PEFT's name
    vera_B: torch.Tensor  # noqa: N815 - PEFT's name

    def __init__(self, config: VeRA, in_max: int, out_max: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.rank = config.rank
        self.key = config.projection_prng_key
        self.saved = config.save_projection
        A, B = projections(config.rank, in_max, out_max, config.projection_prng_key)
        self.register_buffer("vera_A", A.to(dtype), persistent=config.save_projection)
        self.register_buffer("vera_B", B.to(dtype), persistent=config.save_projection)

    def extra_repr(self) -> str:
        return (
            f"A={tuple(self.vera_A.shape)}, B={tuple(self.vera_B.shape)}, key={self.key}, saved={self.saved}"
        )


@register
@dataclass(frozen=True, kw_only=True)
class VeRA(LowRank, defaults={"rank": 256}):
    """Trainable scaling vectors d and b around one frozen random pair A, B shared by all modules.

    Fields (PEFT's defaults in brackets):
        rank: r, the shared projections' rank [256; the paper uses 256 to 1024].
        d_initial: the value every entry of d starts at [0.1; the paper finds small values best].
        dropout: dropout on the adapter's input [0.0].
        projection_prng_key: seed of the shared A and B [0].
        save_projection: also store A and B (the file then reloads without regenerating them)
            [False here: only the vectors are stored; PEFT's default is True].
    """

    d_initial: float = param(
        0.1, Float(), "initial value of every entry of d (0 would leave d and b without gradients)"
    )
    projection_prng_key: int = param(0, Int(min=0), "seed of the shared random A and B")
    save_projection: bool = param(False, Bool(), "also store the shared A and B in the adapter file")

    name: ClassVar[str] = "vera"  # (identity at init: b = 0)

    def default_lr(self) -> float:
        """1e-1: VeRA trains only scaling vectors over frozen random projections, so its rate sits far above
        LoRA's (the paper tunes 4e-3 to 1e-2 for RoBERTa); chosen on SST-2's validation split (MiniLM,
        query/value, 150 steps: benchmarks/README.md, "Each method at its own learning rate"): 81.7 at 1e-1,
        78.9 at 1e-2, 55.0 at 3e-1."""
        return 1e-1

    suite: ClassVar[Suite] = Suite(
        example={"rank": 4},
        variants={"saved-projection": {"fields": {"rank": 3, "save_projection": True}}},
        random_init=False,  # A, B come from projection_prng_key; d, b are constants
    )

    # -- shared state -----------------------------------------------------------------------------
    def make_shared(self, bases: Mapping[str, nn.Module], generator: torch.Generator) -> Projections:
        in_max, out_max = _largest(bases)
        return Projections(self, in_max, out_max, _dtype(bases))

    def shared_parameter_count(self, bases: Mapping[str, nn.Module]) -> int:
        return 0  # frozen

    def shared_stored_bytes(self, bases: Mapping[str, nn.Module]) -> int:
        if not self.save_projection:
            return 0
        in_max, out_max = _largest(bases)
        return self.rank * (in_max + out_max) * _dtype(bases).itemsize

    # -- per module -------------------------------------------------------------------------------
    def parameter_count(self, base: nn.Module) -> int:
        _, out_features = shape_of(base)
        return self.rank + out_features

    def stored_bytes(self, base: nn.Module) -> int:
        return self.parameter_count(base) * adapter_dtype(base).itemsize

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> VeRALayer:
        kind, in_features, out_features = linear_like(base, path, "VeRA", self.layer_types)
        if not isinstance(shared, Projections):
            raise ValueError(f"VeRA: {path!r} got no shared projections")
        for field, mine, theirs in (
            ("rank", self.rank, shared.rank),
            ("projection_prng_key", self.projection_prng_key, shared.key),
            ("save_projection", self.save_projection, shared.saved),
        ):
            if mine != theirs:
                raise ValueError(
                    f"VeRA: {path!r} overrides {field} ({mine} vs the adapter's {theirs}); the random "
                    f"projections are shared by every module, so {field} must be the same everywhere"
                )
        A, B = shared.vera_A, shared.vera_B
        if in_features > A.shape[1] or out_features > B.shape[0] or A.shape[0] < self.rank:
            raise ValueError(
                f"VeRA: {path!r} needs a slice of ({self.rank}, {in_features}) of the shared A and "
                f"({out_features}, {self.rank}) of B, which are {tuple(A.shape)} and {tuple(B.shape)}"
            )
        return VeRALayer(self, kind, in_features, out_features, adapter_dtype(base), shared)


class VeRALayer(LowRankLayer):
    """The vectors d and b of one module; the shared pair is reached through ``shared``, not owned."""

    _shared: Projections

    def __init__(
        self,
        config: VeRA,
        kind: str,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        shared: Projections,
    ) -> None:
        super().__init__(kind, 1.0, config.dropout)
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        self.lambda_b = nn.Parameter(torch.zeros(out_features, dtype=dtype))
        self.lambda_d = nn.Parameter(torch.full((config.rank,), config.d_initial, dtype=dtype))
        # Not a submodule: the pair belongs to the attachment (moved, and saved if at all, once).
        object.__setattr__(self, "_shared", shared)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This module's slices of the shared pair: A[:r, :in], B[:out, :r]."""
        r = self.lambda_d.shape[0]
        return self._shared.vera_A[:r, : self.in_features], self._shared.vera_B[: self.out_features, :r]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Λ_b B Λ_d A x without forming Λ_d A and Λ_b B: the vectors scale the activations."""
        A, B = self.projections()
        dtype = compute_dtype(x, self.lambda_d)
        h = F.linear(self.dropout(x.to(dtype)), A.to(dtype))  # (..., r)
        return self.lambda_b.to(dtype) * F.linear(self.lambda_d.to(dtype) * h, B.to(dtype))  # (..., out)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Λ_d A, Λ_b B): the update is Λ_b B Λ_d A (scale 1)."""
        A, B = self.projections()
        return self.lambda_d[:, None] * A.to(self.lambda_d.dtype), self.lambda_b[:, None] * B.to(
            self.lambda_b.dtype
        )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, rank={self.lambda_d.shape[0]}, in={self.in_features}, out={self.out_features}"
        )
