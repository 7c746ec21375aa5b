"""PEFT's ``LORA`` type: deltatune's LoRA, and its DoRA when the config sets ``use_dora``.

The targets are the modules that have tensors in the file (so PEFT's suffix/regex rules never need
re-implementing); ranks per module come from the tensor shapes, alphas from ``alpha_pattern``.
PEFT stores DoRA as ``peft_type="LORA"`` with ``use_dora=True`` plus one ``lora_magnitude_vector``
per module: :func:`from_peft` reads such a file as :class:`deltatune.methods.lowrank.dora.DoRA`, and
:func:`to_peft` writes DoRA that way. PiSSA & co. export as the plain LoRA they save as
(``save_mode="lora"``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...contract import Method
from ...methods.lowrank.base import Gaussian, KaimingUniform
from ...methods.lowrank.dora import DoRA
from ...methods.lowrank.lora import LoRA
from ...runtime.checks import few
from ...runtime.state import adapter_state
from ...runtime.wrapper import Attachment
from ...targets import module_kind
from .experts import from_peft as experts_from_peft
from .experts import to_peft as experts_to_peft
from .fields import PEFT_TUNER_FIELDS, PeftField, expect, flat_state, module_tensors, peft_get

PREFIX = "base_model.model."

# PEFT's tensor suffixes -> the layer's state keys.
_NAMES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_embedding_A": "lora_A",
    ".lora_embedding_B": "lora_B",
}
_LINEAR = ("lora_A.weight", "lora_B.weight")
_MAGNITUDE = ".lora_magnitude_vector"  # PEFT's name of DoRA's m

# Every field of PEFT's LoraConfig (PeftConfig's own: fields.PEFT_BASE_FIELDS); checked by
# import_peft before from_peft runs. A test walks it against the installed PEFT.
FIELDS: dict[str, PeftField] = {
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
        "'pissa', 'pissa_niter_N', 'olora', 'corda', 'astra', 'loftq' and 'lora_ga' factors saved "
        "unconverted are relative to PEFT's modified (residual) base weight, which deltatune does not "
        "have; save them with PEFT's path_initial_model_for_weight_conversion, which writes the plain "
        "LoRA form (and init_lora_weights=true)",
        "true, false, 'gaussian', 'eva', 'orthogonal' or 'mica' (inits that leave the base weight untouched)",
        (bool, str),
        (True, False, "gaussian", "eva", "orthogonal", "mica"),
    ),
    "loftq_config": PeftField("supported", "init-time only (init 'loftq' is refused)", "an object", (dict,)),
    "eva_config": PeftField(
        "supported", "init-time only: EVA leaves the base untouched", "an object", (dict,)
    ),
    "corda_config": PeftField("supported", "init-time only (init 'corda' is refused)", "an object", (dict,)),
    "astra_config": PeftField("supported", "init-time only (init 'astra' is refused)", "an object", (dict,)),
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
    "lora_bias": PeftField("refused", "a bias on lora_B is not LoRA's update", "false", (bool,), (False,)),
    "use_dora": PeftField(
        "converted", "true imports as deltatune's DoRA (methods/lowrank/dora.py)", "true or false", (bool,)
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
        "converted",
        "LoRA on the 3-D weights of fused MoE experts (LoRA's expert_weights; formats/peft/experts.py)",
        "a list of parameter names",
        (list, str),
    ),
    "use_bdlora": PeftField("refused", "block-diagonal factors (BD-LoRA)", "null", (dict, bool), ()),
    "arrow_config": PeftField("refused", "Arrow routes among several adapters", "null", (dict,), ()),
    "kasa_config": PeftField(
        "refused", "KaSA adds a learnt diagonal and truncates the base", "null", (dict,), ()
    ),
}


def from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[LoRA | DoRA, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """PEFT's LoRA file: a :class:`LoRA`, or a :class:`DoRA` when ``use_dora`` is set."""
    rest, experts, expert_state = experts_from_peft(config, tensors, model, PREFIX)
    if config.get("use_dora"):
        if experts:
            raise ValueError("use_dora with target_parameters: PEFT has no DoRA on bare parameters")
        return _dora_from_peft(config, rest)
    method, targets, overrides, state = _lora_from_peft(config, rest, empty=bool(experts) and not rest)
    for owner, names in experts.items():
        entry: dict[str, Any] = {"expert_weights": names} if names else {}
        ranks = {
            int(t.shape[1])
            for k, t in expert_state.items()
            if k.startswith(f"{owner}.factors.") and k.endswith(".lora_A")
        }
        if len(ranks) > 1:
            raise ValueError(
                f"{owner!r}: its expert weights have ranks {sorted(ranks)}; deltatune gives one per module"
            )
        if ranks != {method.rank}:
            entry["rank"] = ranks.pop()
            entry["alpha"] = method.alpha
        if entry:
            overrides["^" + re.escape(owner) + "$"] = entry
    return method, [*targets, *experts], overrides, {**state, **expert_state}


def to_peft(
    method: Method, attachment: Attachment, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's LoRA config and tensors (``use_dora=true`` for DoRA); per-module ranks and alphas as
    ``rank_pattern`` and ``alpha_pattern``."""
    if isinstance(method, DoRA):
        return _dora_to_peft(method, attachment, name)
    if isinstance(method, LoRA):
        return _lora_to_peft(method, attachment, name)
    raise TypeError(f"the PEFT translator of LoRA and DoRA was given {type(method).__name__}")


def _lora_from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, empty: bool = False
) -> tuple[LoRA, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """``empty``: the file's LoRA is all on expert weights (:mod:`.experts`), none on modules."""
    # path -> {"lora_A": ..., "lora_B": ...}
    factors = {} if empty else module_tensors(tensors, PREFIX, _NAMES, "LoRA")
    rank, alpha = int(peft_get(config, "r", 8)), float(peft_get(config, "lora_alpha", 8))
    method = LoRA(
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
            int(v) for p, v in (config.get("rank_pattern") or {}).items() if re.match(rf"(.*\.)?({p})$", path)
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
    return method, list(factors), overrides, flat_state(factors)


def _dora_from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> tuple[DoRA, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """LoRA's translation plus each module's magnitude vector."""
    magnitudes = {k[len(PREFIX) : -len(_MAGNITUDE)]: v for k, v in tensors.items() if k.endswith(_MAGNITUDE)}
    embedded = sorted(k for k in tensors if ".lora_embedding_" in k)
    if embedded:
        raise ValueError(f"DoRA on embeddings ({embedded[0]!r}) is not supported; DoRA adapts nn.Linear only")
    rest = {k: v for k, v in tensors.items() if not k.endswith(_MAGNITUDE)}
    lora, targets, overrides, state = _lora_from_peft(config, rest)
    missing = sorted(set(targets) - set(magnitudes))
    extra = sorted(set(magnitudes) - set(targets))
    if missing or extra:
        raise ValueError(
            "use_dora=True needs one lora_magnitude_vector per adapted module; "
            + (f"missing for {missing}" if missing else f"found without LoRA factors for {extra}")
        )
    method = DoRA(
        rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, rank_stabilized=lora.rank_stabilized
    )
    state = {**state, **{f"{path}.magnitude": m for path, m in magnitudes.items()}}
    return method, targets, overrides, state


def _lora_to_peft(
    method: LoRA, attachment: Attachment, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    info = attachment.info(name)
    stored = method.stored_method()
    state = adapter_state(attachment.model, name)
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, LoRA] = {}
    kinds = {path: module_kind(attachment.wrappers[path].base) for path in info.targets}
    target_parameters, expert_tensors = experts_to_peft(attachment, name, state, PREFIX)
    tensors.update(expert_tensors)
    for path in info.targets:
        cfg = expect(info.configs[path], LoRA).stored_method()
        if kinds[path] == "experts":
            if (cfg.rank, cfg.alpha) != (stored.rank, stored.alpha):
                raise ValueError(
                    f"{path!r} (fused experts) has rank {cfg.rank} and alpha {cfg.alpha:g}, the "
                    f"adapter {stored.rank} and {stored.alpha:g}: PEFT's target_parameters take none "
                    "of rank_pattern's per-module values here"
                )
            continue
        if hasattr(cfg.init, "from_weight"):
            raise ValueError(
                f"{path!r} uses {type(cfg.init).__name__} with save_mode='native', whose factors are "
                "relative to a residual weight PEFT does not have; use save_mode='lora'"
            )
        if type(cfg.init) not in (KaimingUniform, Gaussian):
            raise ValueError(f"{path!r} uses initialiser {type(cfg.init).__name__}, which PEFT cannot load")
        if cfg.rank_stabilized != stored.rank_stabilized:
            raise ValueError(f"{path!r} overrides rank_stabilized, which PEFT cannot express")
        a, b = ("lora_embedding_A", "lora_embedding_B") if kinds[path] == "embedding" else _LINEAR
        tensors[f"{PREFIX}{path}.{a}"] = state[f"{path}.lora_A"]
        tensors[f"{PREFIX}{path}.{b}"] = state[f"{path}.lora_B"]
        configs[path] = cfg
    fan_in_fan_out = any(kind == "conv1d" for kind in kinds.values())
    config = _config(stored, configs, use_dora=False, fan_in_fan_out=fan_in_fan_out)
    if target_parameters:
        config["target_parameters"] = target_parameters
    return config, tensors


def _dora_to_peft(
    method: DoRA, attachment: Attachment, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    info = attachment.info(name)
    state = adapter_state(attachment.model, name)
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, DoRA] = {}
    for path in info.targets:
        cfg = expect(info.configs[path], DoRA)
        if cfg.rank_stabilized != method.rank_stabilized:
            raise ValueError(f"{path!r} overrides rank_stabilized, which PEFT cannot express")
        for key, peft_key in (("lora_A", _LINEAR[0]), ("lora_B", _LINEAR[1]), ("magnitude", _MAGNITUDE[1:])):
            tensors[f"{PREFIX}{path}.{peft_key}"] = state[f"{path}.{key}"]
        configs[path] = cfg
    return _config(method, configs, use_dora=True, fan_in_fan_out=False), tensors


def _config(
    method: LoRA | DoRA, configs: Mapping[str, LoRA | DoRA], *, use_dora: bool, fan_in_fan_out: bool
) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` for an adapter of ``method`` whose per-module configs are ``configs``
    (path -> config): ranks and alphas that differ from the method's become ``rank_pattern`` /
    ``alpha_pattern`` entries anchored on the whole path."""
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
