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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ...contract import ExpertsLayer, LowRankLayer, Suite, dropout_module, register
from ...contract.fields import Instance, OneOf, SubsetOf, param
from ...targets import EXPERT_WEIGHTS, expert_weights, module_kind
from .base import KaimingUniform, LoRAInit, ScaledLowRank, adapter_dtype, linear_like


@register
@dataclass(frozen=True, kw_only=True)
class LoRA(ScaledLowRank):
    """Low-rank update of a weight.

    Fields (paper defaults in brackets):
        rank: r, the rank of the update [8; the paper finds r = 1..8 enough on GPT-3].
        alpha: scaling numerator; the update is scaled by alpha/r [8, as PEFT].
        dropout: dropout on the adapter's input [0.0; the paper uses 0.1 on some GLUE tasks].
        rank_stabilized: rsLoRA scaling alpha/sqrt(r) instead of alpha/r [False].
        init: initialiser of A and B [KaimingUniform()]; PiSSA(), MiLoRA(), CorDA(...) take the
            factors out of the weight (see :mod:`deltatune.methods.lowrank.pissa`).
        save_mode: for those weight-derived inits, "lora" saves a plain rank-2r LoRA
            ``[B | −B0] [A ; A0]`` on the original weight (loads anywhere, PEFT included); "native"
            saves only the rank-r factors and recomputes the frozen ``A0, B0`` from the base at load
            (half the bytes; needs the same base and init config) ["lora"].
    """

    init: LoRAInit = param(KaimingUniform(), Instance((LoRAInit,)), "initialiser of A and B")  # noqa: RUF009 - a frozen, immutable default
    save_mode: str = param(
        "lora",
        OneOf(("lora", "native")),
        "with a weight-derived init (PiSSA, MiLoRA, CorDA): 'lora' saves a plain rank-2r LoRA on the "
        "original weight; 'native' saves the rank-r factors (the frozen part is recomputed at load)",
    )

    expert_weights: tuple[str, ...] = param(
        (),
        SubsetOf(EXPERT_WEIGHTS),
        "on fused MoE experts: the 3-D weights to adapt (gate_up_proj or up_proj, down_proj); () "
        "adapts all of them (a target naming a weight, 'experts.down_proj', sets this per module)",
    )
    expert_shared: str = param(
        "none",
        OneOf(("none", "A", "B")),
        "on fused MoE experts: 'none' gives every expert its own A and B; 'A' (or 'B') shares one A "
        "(or B) among the experts of a weight",
    )

    name: ClassVar[str] = "lora"

    def default_lr(self) -> float:
        """3e-3, chosen on SST-2's validation split (MiniLM, query/value, 150 steps: benchmarks/README.md,
        "Each method at its own learning rate"): 81.2 at 1e-3, 82.5 at 3e-3, 74.3 at 1e-2 (rsLoRA's scaling
        and PiSSA's init chose 3e-3 too, as did MiLoRA, CorDA, QLoRA, QPiSSA, LoRA-drop, ReLoRA and LoRA on
        every linear layer). At r = 4 the grid chose 9e-3 (83.3 against 82.5 at 3e-3, one seed): a lower
        rank takes a higher rate; give ``--lr`` there."""
        return 3e-3

    combinable: ClassVar[bool] = True
    layer_types: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "embedding", "experts")
    # Other configurations the invariant suite runs (initialisers in JSON form; see methods/lowrank/pissa.py).
    suite: ClassVar[Suite] = Suite(
        example={"rank": 4},
        variants={
            "pissa": {
                "fields": {"rank": 2, "init": {"type": "pissa"}},
                "layer_types": ("linear", "conv1d"),
                "quantized_base": False,  # takes the float weight apart (QPiSSA: quantise after inject)
                "random_init": False,  # the factors come from the weight's SVD
            },
            "pissa-randomized": {
                "fields": {"rank": 2, "init": {"type": "pissa", "svd": "randomized", "niter": 2}},
                "layer_types": ("linear", "conv1d"),
                "quantized_base": False,
            },
            "corda": {
                "fields": {"rank": 2, "init": {"type": "corda", "covariance": "<calibration>"}},
                "calibration": True,  # the suite supplies input covariances from calibration data
                "layer_types": ("linear", "conv1d"),
                "quantized_base": False,
                "random_init": False,
            },
            "milora-native": {
                "fields": {"rank": 2, "init": {"type": "milora"}, "save_mode": "native"},
                "layer_types": ("linear", "conv1d"),
                "quantized_base": False,
                "random_init": False,
            },
        },
    )

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> LoRALayer | ExpertsLoRALayer:
        if module_kind(base) == "experts":
            return ExpertsLoRALayer(self, base, path, generator)
        kind, in_features, out_features = linear_like(base, path, "LoRA", self.layer_types)
        layer = LoRALayer(self, kind, in_features, out_features, adapter_dtype(base), base)
        from_weight = getattr(self.init, "from_weight", None)
        if from_weight is None:
            self.init.initialise(layer.lora_A.data, layer.lora_B.data, kind=kind, generator=generator)
            return layer
        what = type(self.init).__name__
        if kind == "embedding":
            raise ValueError(f"LoRA: {what} initialises from a linear weight; {path!r} is an embedding")
        if self.rank > min(in_features, out_features):
            raise ValueError(
                f"LoRA.rank must be <= min(in_features, out_features) = {min(in_features, out_features)} "
                f"for {what} on {path!r}, got {self.rank}"
            )
        weight = base.weight
        if (
            not isinstance(weight, torch.Tensor)
            or type(weight) not in (torch.Tensor, nn.Parameter)
            or (not weight.is_floating_point())
        ):
            raise ValueError(
                f"LoRA: {what} needs the full-precision weight of {path!r}, which is "
                f"{type(weight).__name__}; initialise the adapter first, then quantise the base "
                "(deltatune.quantize), which then quantises the residual (QPiSSA)"
            )
        w = weight.detach().float()
        w = w if kind == "linear" else w.t()  # (out, in)
        A, B = from_weight(w, self.rank, self.scale, generator=generator, path=path)
        layer.set_factors(A, B, frozen_copy=True)
        return layer

    def parameter_count(self, base: nn.Module) -> int:
        if module_kind(base) == "experts":
            return sum(A.numel() + B.numel() for A, B in expert_factor_shapes(self, base, "").values())
        return self.factor_count(base)

    def stored_bytes(self, base: nn.Module) -> int:
        doubled = 2 if self.saves_as_plain_lora else 1
        return self.parameter_count(base) * adapter_dtype(base).itemsize * doubled

    @property
    def saves_as_plain_lora(self) -> bool:
        """A weight-derived init in "lora" save mode: the file holds a plain LoRA of rank 2r."""
        return self.save_mode == "lora" and hasattr(self.init, "from_weight")

    def stored_method(self) -> LoRA:
        """The config the saved file records: a weight-derived init in "lora" mode saves as plain LoRA."""
        if not self.saves_as_plain_lora:
            return self
        rank = 2 * self.rank
        alpha = self.scale * (math.sqrt(rank) if self.rank_stabilized else rank)
        out = LoRA(rank=rank, alpha=alpha, dropout=self.dropout, rank_stabilized=self.rank_stabilized)
        while out.scale != self.scale:  # keep the scale bit-identical, so reloading is exact
            alpha = math.nextafter(alpha, math.inf if out.scale < self.scale else -math.inf)
            out = dataclasses.replace(out, alpha=alpha)
        return out


def lora_of(method: ScaledLowRank) -> LoRA:
    """The LoRA configuration with ``method``'s rank, alpha, dropout and scaling: what the layers of
    LoRA-FA, Delta-LoRA and ReLoRA are built from."""
    return LoRA(
        rank=method.rank, alpha=method.alpha, dropout=method.dropout, rank_stabilized=method.rank_stabilized
    )


class LoRALayer(LowRankLayer):
    """The trainable part of one LoRA-adapted module; the base module is passed in, never owned."""

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
        super().__init__(kind, config.scale, config.dropout)
        self.config = config
        self.lora_A = nn.Parameter(torch.zeros(config.rank, in_features, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank, dtype=dtype))  # (out, r)
        if embedding_kwargs is None and isinstance(base, nn.Embedding):
            embedding_kwargs = {
                "padding_idx": base.padding_idx,
                "max_norm": base.max_norm,
                "norm_type": base.norm_type,
                "scale_grad_by_freq": base.scale_grad_by_freq,
                "sparse": base.sparse,
            }
        self.embedding_kwargs = embedding_kwargs or {}
        # Weight-derived inits (PiSSA family): the frozen initial factors, subtracted in the forward
        # pass, so that the base weight itself is never modified. Not saved: see LoRA.save_mode.
        self.frozen_A: torch.Tensor | None
        self.frozen_B: torch.Tensor | None
        self.register_buffer("frozen_A", None, persistent=False)
        self.register_buffer("frozen_B", None, persistent=False)

    def set_factors(self, A: torch.Tensor, B: torch.Tensor, *, frozen_copy: bool) -> None:
        """Set A and B (e.g. from the weight's SVD); ``frozen_copy`` also keeps them as the frozen part."""
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
        if frozen_copy:
            self.frozen_A = self.lora_A.detach().clone()
            self.frozen_B = self.lora_B.detach().clone()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) such that the update is s · B A: [A ; A0] and [B | −B0] with a frozen part."""
        if self.frozen_A is None or self.frozen_B is None:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, self.frozen_A]), torch.cat([self.lora_B, -self.frozen_B], dim=1)

    def export_state(self) -> dict[str, torch.Tensor]:
        """What the file stores: the effective factors in "lora" save mode (see LoRA.save_mode)."""
        if self.frozen_A is not None and self.config.save_mode == "lora":
            A, B = self.factors()
            return {"lora_A": A.detach(), "lora_B": B.detach()}
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_state` (splits [A ; A0], [B | −B0] back, exactly)."""
        A, B = state["lora_A"], state["lora_B"]
        r = self.lora_A.shape[0]
        if self.frozen_A is not None and self.frozen_B is not None and A.shape[0] == 2 * r:
            with torch.no_grad():
                self.lora_A.copy_(A[:r])
                self.lora_B.copy_(B[:, :r])
                self.frozen_A.copy_(A[r:])
                self.frozen_B.copy_(-B[:, r:])
            return
        self.load_state_dict({"lora_A": A, "lora_B": B}, strict=True)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.lora_A.shape[0]}, scale={self.scale:g}"


class _Shapes(NamedTuple):
    """The shapes of one expert weight's factors (``numel`` for the counts)."""

    A: torch.Size
    B: torch.Size


def expert_factor_shapes(config: LoRA, base: nn.Module, path: str) -> dict[str, _Shapes]:
    """weight name -> the shapes of its factors, ``A`` ``(experts, r, in)`` and ``B`` ``(experts,
    out, r)`` (one expert where ``expert_shared`` shares that factor), for the fused experts ``base``."""
    present = expert_weights(base)
    names = config.expert_weights or present
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(
            f"LoRA.expert_weights names {missing}, which {path!r} ({type(base).__name__}) does not "
            f"have; its expert weights are {list(present)}"
        )
    out: dict[str, _Shapes] = {}
    for name in names:
        weight = base._parameters[name]
        assert weight is not None
        experts, d1, d2 = weight.shape
        fan_in, fan_out = (d1, d2) if base.is_transposed else (d2, d1)
        a_experts = 1 if config.expert_shared == "A" else experts
        b_experts = 1 if config.expert_shared == "B" else experts
        out[name] = _Shapes(
            torch.Size((a_experts, config.rank, fan_in)), torch.Size((b_experts, fan_out, config.rank))
        )
    return out


class ExpertFactors(nn.Module):
    """The factors of one fused expert weight: ``lora_A`` ``(experts, r, in)``, ``lora_B``
    ``(experts, out, r)`` (one expert for a shared factor)."""

    def __init__(self, shapes: _Shapes, dtype: torch.dtype) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(shapes.A, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(shapes.B, dtype=dtype))


class ExpertsLoRALayer(ExpertsLayer):
    """LoRA on the 3-D weights of fused MoE experts: expert ``e``'s weight gets ``s · B[e] A[e]``
    (with ``expert_shared``, one ``A`` or ``B`` for all experts), applied by
    :mod:`deltatune.kernels.experts` without forming any expert's dense update. Every ``A[e]``
    starts as LoRA's (Kaiming-uniform, or the configured random init), every ``B[e]`` at zero."""

    def __init__(self, config: LoRA, base: nn.Module, path: str, generator: torch.Generator) -> None:
        super().__init__()
        if hasattr(config.init, "from_weight"):
            raise ValueError(
                f"LoRA: {type(config.init).__name__} initialises from a 2-D weight; {path!r} holds "
                "fused experts: use a random init (KaimingUniform, Gaussian) there"
            )
        self.config = config
        self.scale = config.scale
        self.dropout = dropout_module(config.dropout)
        dtype = adapter_dtype(base)
        self.factors = nn.ModuleDict()
        for name, shapes in expert_factor_shapes(config, base, path).items():
            factors = ExpertFactors(shapes, dtype)
            A, B = factors.lora_A.data, factors.lora_B.data
            for e in range(A.shape[0]):  # (initialise zeroes B: every B[e] starts at zero)
                config.init.initialise(A[e], B[min(e, B.shape[0] - 1)], kind="linear", generator=generator)
            self.factors[name] = factors
        self.experts = int(base._parameters[expert_weights(base)[0]].shape[0])  # type: ignore[union-attr]

    def expert_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, nn.Module]]:
        out: dict[str, tuple[torch.Tensor, torch.Tensor, float, nn.Module]] = {}
        for name, factors in self.factors.items():
            assert isinstance(factors, ExpertFactors)
            A: torch.Tensor = factors.lora_A
            B: torch.Tensor = factors.lora_B
            A = A.expand(self.experts, -1, -1) if A.shape[0] == 1 < self.experts else A
            B = B.expand(self.experts, -1, -1) if B.shape[0] == 1 < self.experts else B
            out[name] = (A, B, self.scale, self.dropout)
        return out

    def extra_repr(self) -> str:
        ranks = {n: f.lora_A.shape[1] for n, f in self.factors.items() if isinstance(f, ExpertFactors)}
        return f"experts={self.experts}, ranks={ranks}, scale={self.scale:g}"
