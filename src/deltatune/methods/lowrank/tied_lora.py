"""Tied-LoRA: Enhancing parameter efficiency of LoRA with weight tying (Renduchintala, Konuk,
Kuchaiev; NAACL 2024), arXiv:2311.09578.

    y = W0 x + s · Λ_v B Λ_u A dropout(x),    A: (r, in), B: (out, r) tied;  u: (r,), v: (out,) per layer

with s = alpha / r. One (A, B) pair is shared by every adapted module of a *group*; each module keeps
its own scaling vectors u and v.

Grouping: modules are grouped by the last component of their path (``layers.3.self_attn.q_proj`` is in
group ``q_proj``; in an ``nn.Sequential`` the position, ``"0"``, ``"2"``, is the group). All modules of
a group must have the same (in, out) shape; a group whose modules differ is refused, naming them
(target them apart, or rename). Overriding ``rank`` or ``train`` per module is refused too: the
factors are shared.

Variants (``train``): which of A, B, u, v train (the letters in the order A, B, u, v; ``"ABuv"`` is the
default, the paper's fully trainable tied configuration). A frozen u or v is the constant 1 and holds
no tensor; a frozen A or B stays at its random init and is still saved (it is needed to reproduce the
outputs). Init, chosen so that every variant is the base model at init (``identity_at_init``):

* A ~ U(−1/√in, 1/√in) (LoRA's Kaiming-uniform), u = 1;
* B trainable: B = 0 and v = 1 (LoRA's init);
* B frozen: B ~ U(−1/√r, 1/√r) and v = 0 (VeRA's choice for its output vector), so a frozen B needs a
  trainable v: the variants without B and v (``"A"``, ``"u"``, ``"Au"``) would never move and are not
  offered.

Closed forms, per group g with shape (in_g, out_g) and per adapted module with output size out:

    trainable = Σ_g ([A] r·in_g + [B] r·out_g) + Σ_modules ([u] r + [v] out)
    stored bytes = 4 · (Σ_g r·(in_g + out_g) + Σ_modules ([u] r + [v] out))   (float32)

([X]: 1 when X trains.) With every factor trainable, stored = 4 · trainable.

PEFT has no Tied-LoRA, so there is no PEFT import or export.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deltatune import inject
    >>> from deltatune.methods.lowrank.tied_lora import TiedLoRA
    >>> block = lambda: nn.ModuleDict({"q": nn.Linear(8, 8)})
    >>> net = nn.ModuleDict({"a": block(), "b": block()})
    >>> att = inject(net, TiedLoRA(rank=2), targets=["a.q", "b.q"])
    >>> att.closed_form("default")  # one (A, B): 2*(8+8); per module u (2) and v (8)
    (52, 208)
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
from ...contract.fields import OneOf, param
from ...kernels.lowrank import compute_dtype
from ...targets import shape_of
from .base import ScaledLowRank, adapter_dtype, linear_like

#: The trainable subsets offered (letters in the order A, B, u, v): B trains, or v does.
TRAIN_OPTIONS: tuple[str, ...] = (
    "ABuv",
    "ABu",
    "ABv",
    "AB",
    "Buv",
    "Bu",
    "Bv",
    "B",
    "Auv",
    "Av",
    "uv",
    "v",
)


def group_of(path: str) -> str:
    """The tying group of a module: the last component of its path."""
    return path.rpartition(".")[2]


def groups_of(bases: Mapping[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """Group -> (in, out) of its modules; refuses a group whose modules differ in shape."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    for path, base in bases.items():
        members.setdefault(group_of(path), {})[path] = shape_of(base)
    out: dict[str, tuple[int, int]] = {}
    for group, shapes in members.items():
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{p!r} (in={i}, out={o})" for p, (i, o) in shapes.items())
            raise ValueError(
                f"TiedLoRA: the modules of group {group!r} (grouped by the last path component) differ "
                f"in shape: {listed}; A and B are tied within a group, so its modules must have one "
                "(in, out) shape: target them separately (another adapter) or leave some out"
            )
        out[group] = next(iter(shapes.values()))
    return out


class TiedFactors(nn.Module):
    """The (A, B) of one group; a frozen factor is a (saved) buffer, a trainable one a parameter."""

    lora_A: torch.Tensor  # noqa: N815 (the saved names, as LoRA's)
    lora_B: torch.Tensor  # noqa: N815

    def __init__(
        self,
        rank: int,
        in_features: int,
        out_features: int,
        train: str,
        dtype: torch.dtype,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        A = torch.empty(rank, in_features, dtype=dtype)
        bound = 1.0 / math.sqrt(in_features)
        A.uniform_(-bound, bound, generator=generator)
        B = torch.zeros(out_features, rank, dtype=dtype)
        if "B" not in train:  # frozen B: random, v = 0 keeps the update at zero
            bound = 1.0 / math.sqrt(rank)
            B.uniform_(-bound, bound, generator=generator)
        for name, value, trains in (("lora_A", A, "A" in train), ("lora_B", B, "B" in train)):
            if trains:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}"


class TiedShared(nn.Module):
    """Every group's factors of one adapter (``groups[key]``; see :func:`group_key`)."""

    def __init__(self, rank: int, train: str) -> None:
        super().__init__()
        self.rank = rank
        self.train_spec = train
        self.groups = nn.ModuleDict()

    def group(self, path: str) -> TiedFactors:
        factors = self.groups[group_key(self.groups, group_of(path))]
        assert isinstance(factors, TiedFactors)
        return factors


def group_key(container: nn.ModuleDict, group: str) -> str:
    """The key of a group in the ModuleDict: its name, with ``_`` appended while that name is an
    attribute of the container (a module named ``train`` or ``keys``); ``root`` for the model itself."""
    key = group or "root"  # (the model itself, path "")
    while hasattr(nn.ModuleDict, key) or key in ("training", "_modules"):
        key += "_"
    return key


@register
@dataclass(frozen=True, kw_only=True)
class TiedLoRA(ScaledLowRank):
    """LoRA with A and B tied across the modules of a group, and per-module scaling vectors.

    Fields (defaults in brackets):
        rank: r, the rank of the tied factors [8].
        alpha: the update is scaled by alpha / r [8.0, as LoRA].
        dropout: dropout on the adapter's input [0.0].
        train: which of A, B, u, v train, e.g. "ABuv" (all: the paper's fully trainable tied
            configuration), "AB" (tied LoRA with u = v = 1), "uv" (frozen random A, B: VeRA-like per
            group) ["ABuv"]. See the module docstring for the inits.
    """

    train: str = param(
        "ABuv",
        OneOf(TRAIN_OPTIONS),
        "which of the tied A, B and the per-module u, v train (frozen u, v are 1; a frozen B needs v)",
    )

    name: ClassVar[str] = "tied_lora"
    suite: ClassVar[Suite] = Suite(
        example={"rank": 2},
        variants={"AB": {"fields": {"rank": 2, "train": "AB"}}, "uv": {"fields": {"rank": 2, "train": "uv"}}},
    )

    def default_lr(self) -> float:
        """3e-3, as LoRA's; chosen on SST-2's validation split (MiniLM, query/value, 150 steps:
        benchmarks/README.md, "Each method at its own learning rate"): 83.0 at 3e-3, 82.0 at 1e-3,
        79.7 at 1e-2."""
        return 3e-3

    # -- shared state -----------------------------------------------------------------------------
    def make_shared(self, bases: Mapping[str, nn.Module], generator: torch.Generator) -> TiedShared:
        shared = TiedShared(self.rank, self.train)
        first = {group_of(p): b for p, b in reversed(list(bases.items()))}
        for group, (in_features, out_features) in groups_of(bases).items():
            shared.groups[group_key(shared.groups, group)] = TiedFactors(
                self.rank, in_features, out_features, self.train, adapter_dtype(first[group]), generator
            )
        return shared

    def shared_parameter_count(self, bases: Mapping[str, nn.Module]) -> int:
        count = 0
        for in_features, out_features in groups_of(bases).values():
            count += self.rank * (in_features * ("A" in self.train) + out_features * ("B" in self.train))
        return count

    def shared_stored_bytes(self, bases: Mapping[str, nn.Module]) -> int:
        return 4 * sum(self.rank * (i + o) for i, o in groups_of(bases).values())

    # -- per module -------------------------------------------------------------------------------
    def parameter_count(self, base: nn.Module) -> int:
        _, out_features = shape_of(base)
        return self.rank * ("u" in self.train) + out_features * ("v" in self.train)

    def stored_bytes(self, base: nn.Module) -> int:
        return 4 * self.parameter_count(base)

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> TiedLoRALayer:
        kind, in_features, out_features = linear_like(base, path, "TiedLoRA", self.layer_types)
        if not isinstance(shared, TiedShared) or (shared.rank, shared.train_spec) != (self.rank, self.train):
            raise ValueError(
                f"TiedLoRA: {path!r} overrides rank or train; A and B are shared by the modules of a "
                "group, so those fields must be the same everywhere"
            )
        factors = shared.group(path)
        if (factors.lora_A.shape[1], factors.lora_B.shape[0]) != (in_features, out_features):
            raise ValueError(  # (only when wrap is given other modules than make_shared saw)
                f"TiedLoRA: {path!r} has (in, out) = ({in_features}, {out_features}), but its group "
                f"{group_of(path)!r} was made for {(factors.lora_A.shape[1], factors.lora_B.shape[0])}"
            )
        return TiedLoRALayer(self, kind, out_features, factors, adapter_dtype(base))


class TiedLoRALayer(LowRankLayer):
    """The per-module part (u, v) of a Tied-LoRA module; the group's A and B are reached, not owned."""

    _factors: TiedFactors
    u: torch.Tensor | None
    v: torch.Tensor | None

    def __init__(
        self, config: TiedLoRA, kind: str, out_features: int, factors: TiedFactors, dtype: torch.dtype
    ) -> None:
        super().__init__(kind, config.scale, config.dropout)
        self.config = config
        r = config.rank
        self.u = nn.Parameter(torch.ones(r, dtype=dtype)) if "u" in config.train else None
        v_init = 1.0 if "B" in config.train else 0.0
        self.v = (
            nn.Parameter(torch.full((out_features,), v_init, dtype=dtype)) if "v" in config.train else None
        )
        # Not a submodule: the factors belong to the adapter's shared state, saved and counted once.
        object.__setattr__(self, "_factors", factors)

    def tied(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's tied (A, B), the very tensors every module of the group uses."""
        return self._factors.lora_A, self._factors.lora_B

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Λu A, Λv B): the update is s · (Λv B)(Λu A)."""
        A, B = self.tied()
        if self.u is not None:
            A = self.u.unsqueeze(1) * A
        if self.v is not None:
            B = self.v.unsqueeze(1) * B
        return A, B

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · Λv B Λu A x without forming Λu A and Λv B: the vectors scale the activations."""
        A, B = self.tied()
        dtype = compute_dtype(x, A)
        h = F.linear(self.dropout(x.to(dtype)), A.to(dtype))  # (..., r)
        h = h * (self.scale if self.u is None else (self.u * self.scale).to(dtype))
        y = F.linear(h, B.to(dtype))  # (..., out)
        return y if self.v is None else y * self.v.to(dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.config.rank}, train={self.config.train}, scale={self.scale:g}"
