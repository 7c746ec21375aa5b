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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from ...checks import few
from ...contract import LowRankLayer, Suite, register
from ...contract.fields import Instance, OneOf, param
from ...interop import PEFT_TUNER_FIELDS, PeftField, peft_get
from ...state import adapter_state
from ...targets import module_kind
from ...wrapper import Attachment
from .base import Gaussian, KaimingUniform, LoRAInit, ScaledLowRank, adapter_dtype, linear_like


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

    name: ClassVar[str] = "lora"
    combinable: ClassVar[bool] = True
    layer_types: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "embedding")
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
    ) -> LoRALayer:
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
        factors = [layer.factors() for layer in layers]
        rank = sum(int(A.shape[0]) for A, _ in factors)
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
            out.lora_A.copy_(torch.cat([A for A, _ in factors], dim=0))
            out.lora_B.copy_(
                torch.cat(
                    [
                        w * layer.scale * B
                        for layer, (_, B), (_, w) in zip(layers, factors, parts, strict=True)
                    ],
                    dim=1,
                )
            )
        out.to(first.lora_A.device)
        return config, out

    # -- PEFT's format (the hooks: deltatune.peft) -----------------------------------------------
    peft_type: ClassVar[str] = "LORA"
    peft_prefix: ClassVar[str] = "base_model.model."

    # Every field of PEFT's LoraConfig (PeftConfig's own: deltatune.peft.PEFT_BASE_FIELDS); checked by
    # import_peft before from_peft runs. A test walks it against the installed PEFT.
    peft_fields: ClassVar[Mapping[str, PeftField]] = {
        "r": PeftField("converted", "rank", "a positive integer", (int,)),
        "lora_alpha": PeftField("converted", "alpha", "a positive number", (int, float)),
        "lora_dropout": PeftField("converted", "dropout", "a number in [0, 1)", (int, float)),
        "use_rslora": PeftField("converted", "rank_stabilized", "true or false", (bool,)),
        "rank_pattern": PeftField(
            "converted", "ranks per module are read off the tensor shapes", "an object", (dict,)
        ),
        "alpha_pattern": PeftField("converted", "per-module alpha overrides", "an object", (dict,)),
        **PEFT_TUNER_FIELDS,  # where the adapter goes: shared by PEFT's layer tuners
        "init_lora_weights": PeftField(
            "refused",
            "'pissa', 'pissa_niter_N', 'olora', 'corda', 'loftq' and 'lora_ga' factors saved unconverted "
            "are relative to PEFT's modified (residual) base weight, which deltatune does not have; save "
            "them with PEFT's path_initial_model_for_weight_conversion, which writes the plain LoRA form "
            "(and init_lora_weights=true)",
            "true, false, 'gaussian', 'eva', 'orthogonal' or 'mica' (inits that leave the base weight "
            "untouched)",
            (bool, str),
            (True, False, "gaussian", "eva", "orthogonal", "mica"),
        ),
        "loftq_config": PeftField(
            "supported", "init-time only (init 'loftq' is refused)", "an object", (dict,)
        ),
        "eva_config": PeftField(
            "supported", "init-time only: EVA leaves the base untouched", "an object", (dict,)
        ),
        "corda_config": PeftField(
            "supported", "init-time only (init 'corda' is refused)", "an object", (dict,)
        ),
        "lora_ga_config": PeftField(
            "supported", "init-time only (init 'lora_ga' is refused)", "an object", (dict,)
        ),
        "velora_config": PeftField(
            "supported", "changes only the backward pass (compressed activations)", "an object", (dict,)
        ),
        "runtime_config": PeftField("supported", "runtime-only, never saved by PEFT", "an object", (dict,)),
        "megatron_core": PeftField("supported", "no effect without megatron_config", "a string", (str,)),
        "qalora_group_size": PeftField("supported", "no effect without use_qalora", "an integer", (int,)),
        "bias": PeftField("refused", "deltatune's LoRA trains no biases", "'none'", (str,), ("none",)),
        "lora_bias": PeftField(
            "refused", "a bias on lora_B is not LoRA's update", "false", (bool,), (False,)
        ),
        "use_dora": PeftField(
            "converted",
            "true imports as deltatune's DoRA (methods/lowrank/dora.py)",
            "true or false",
            (bool,),
        ),
        "use_qalora": PeftField("refused", "QA-LoRA pools the input group-wise", "false", (bool,), (False,)),
        "ensure_weight_tying": PeftField(
            "refused", "deltatune does not tie the adapters of tied layers", "false", (bool,), (False,)
        ),
        "layer_replication": PeftField(
            "refused", "PEFT stacks copies of base layers that the model does not have", "null", (list,), ()
        ),
        "megatron_config": PeftField("refused", "Megatron parallel layers", "null", (dict,), ()),
        "trainable_token_indices": PeftField(
            "refused", "PEFT's trainable-token deltas are not imported", "null", (list, dict), ()
        ),
        "alora_invocation_tokens": PeftField(
            "refused", "aLoRA applies the update only after the invocation tokens", "null", (list,), ()
        ),
        "monteclora_config": PeftField("refused", "MonteCLoRA samples its update", "null", (dict,), ()),
        "target_parameters": PeftField(
            "refused", "LoRA on bare parameters (MoE experts) is not imported", "null", (list, str), ()
        ),
        "use_bdlora": PeftField("refused", "block-diagonal factors (BD-LoRA)", "null", (dict, bool), ()),
        "arrow_config": PeftField("refused", "Arrow routes among several adapters", "null", (dict,), ()),
        "kasa_config": PeftField(
            "refused", "KaSA adds a learnt diagonal and truncates the base", "null", (dict,), ()
        ),
    }

    @classmethod
    def from_peft(
        cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
    ) -> tuple[Any, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
        """PEFT's LoRA: the targets are the modules that have tensors in the file (so PEFT's
        suffix/regex rules never need re-implementing); ranks per module from the tensor shapes,
        alphas from ``alpha_pattern``. (A file with ``use_dora`` is DoRA's: deltatune.peft hands
        it to methods/lowrank/dora.py.)"""
        factors: dict[str, dict[str, torch.Tensor]] = {}  # path -> {"lora_A": ..., "lora_B": ...}
        for key, value in tensors.items():
            suffix = next((s for s in _PEFT_NAMES if key.endswith(s)), None)
            if suffix is None or not key.startswith(cls.peft_prefix):
                raise ValueError(f"unexpected tensor {key!r}: neither LoRA's nor in modules_to_save")
            factors.setdefault(key[len(cls.peft_prefix) : -len(suffix)], {})[_PEFT_NAMES[suffix]] = value
        if not factors:
            raise ValueError("holds no LoRA tensors")
        rank, alpha = int(peft_get(config, "r", 8)), float(peft_get(config, "lora_alpha", 8))
        method = cls(
            rank=rank,
            alpha=alpha,
            dropout=float(peft_get(config, "lora_dropout", 0.0)),
            rank_stabilized=bool(peft_get(config, "use_rslora", False)),
        )
        overrides: dict[str, dict[str, Any]] = {}
        wrong: list[str] = []
        for path, pair in factors.items():
            r = int(pair["lora_A"].shape[0]) if "lora_A" in pair else int(pair["lora_B"].shape[-1])
            # The rank PEFT gives the module (r, or a rank_pattern entry that matches it) must be the
            # tensors': PEFT refuses such a file, and r decides the scale alpha / r.
            given = {rank} | {
                int(v)
                for p, v in (config.get("rank_pattern") or {}).items()
                if re.match(rf"(.*\.)?({p})$", path)
            }
            if r not in given:
                shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in pair.items())
                wrong.append(
                    f"{path!r}: the config gives rank {sorted(given)[-1]:,}, the tensors hold {r} ({shapes})"
                )
            a = alpha
            for pattern, value in (config.get("alpha_pattern") or {}).items():
                if re.match(rf"(.*\.)?({pattern})$", path):
                    a = float(value)
            if r != rank or a != alpha:
                overrides[path] = {"rank": r, "alpha": a}
        if wrong:
            raise ValueError(
                f"r / rank_pattern do not match the stored tensors, so nothing was built: {few(wrong, 4)}; "
                "was adapter_config.json edited, or copied from another save?"
            )
        state = {f"{path}.{k}": v for path, pair in factors.items() for k, v in pair.items()}
        return method, list(factors), overrides, state

    def to_peft(self, attachment: Attachment, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's LoRA config and tensors; per-module ranks and alphas as ``rank_pattern`` and
        ``alpha_pattern``. PiSSA & co. export as the plain LoRA they save as (``save_mode="lora"``)."""
        info = attachment.info(name)
        stored = self.stored_method()
        state = adapter_state(attachment.model, name)
        tensors: dict[str, torch.Tensor] = {}
        configs: dict[str, LoRA] = {}
        kinds = {path: module_kind(attachment.wrappers[path].base) for path in info.targets}
        for path in info.targets:
            cfg = cast(LoRA, info.configs[path]).stored_method()
            if hasattr(cfg.init, "from_weight"):
                raise ValueError(
                    f"{path!r} uses {type(cfg.init).__name__} with save_mode='native', whose factors are "
                    "relative to a residual weight PEFT does not have; use save_mode='lora'"
                )
            if type(cfg.init) not in (KaimingUniform, Gaussian):
                raise ValueError(
                    f"{path!r} uses initialiser {type(cfg.init).__name__}, which PEFT cannot load"
                )
            if cfg.rank_stabilized != stored.rank_stabilized:
                raise ValueError(f"{path!r} overrides rank_stabilized, which PEFT cannot express")
            a, b = ("lora_embedding_A", "lora_embedding_B") if kinds[path] == "embedding" else _PEFT_LINEAR
            tensors[f"{self.peft_prefix}{path}.{a}"] = state[f"{path}.lora_A"]
            tensors[f"{self.peft_prefix}{path}.{b}"] = state[f"{path}.lora_B"]
            configs[path] = cfg
        fan_in_fan_out = any(kind == "conv1d" for kind in kinds.values())
        return peft_lora_config(stored, configs, use_dora=False, fan_in_fan_out=fan_in_fan_out), tensors


def peft_lora_config(
    method: Any, configs: Mapping[str, Any], *, use_dora: bool, fan_in_fan_out: bool
) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` for an adapter of ``method`` (LoRA or DoRA) whose per-module configs
    are ``configs`` (path -> config): ranks and alphas that differ from the method's become
    ``rank_pattern`` / ``alpha_pattern`` entries anchored on the whole path."""
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, cfg in configs.items():
        if cfg.rank != method.rank:
            rank_pattern["^" + re.escape(path) + "$"] = cfg.rank
        if cfg.alpha != method.alpha:
            alpha_pattern["^" + re.escape(path) + "$"] = cfg.alpha
    return {
        "r": method.rank,
        "lora_alpha": method.alpha,
        "lora_dropout": method.dropout,
        "use_rslora": method.rank_stabilized,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "use_dora": use_dora,
        "target_modules": sorted(configs),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
    }


# PEFT's tensor suffixes -> the layer's state keys.
_PEFT_NAMES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_embedding_A": "lora_A",
    ".lora_embedding_B": "lora_B",
}
_PEFT_LINEAR = ("lora_A.weight", "lora_B.weight")


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
