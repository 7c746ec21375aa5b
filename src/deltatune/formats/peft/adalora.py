"""PEFT's ``ADALORA`` type: deltatune's AdaLoRA.

``lora_A``, ``lora_E``, ``lora_B`` under ``base_model.model.<path>.``; init_r, target_r, tinit,
tfinal, deltaT (deltatune's ``delta_t``), beta1, beta2, orth_reg_weight, total_step, lora_alpha
(``alpha``), lora_dropout (``dropout``); PEFT's ``rank_pattern`` (a keep-mask per module) is
``kept_rank`` per module. The targets are the modules with tensors in the file; the kept rank of a
pruned module is its tensors' (PEFT slices them by ``rank_pattern`` when saving).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...contract import Method
from ...methods.lowrank.adalora import AdaLoRA
from ...runtime.state import adapter_state
from ...runtime.wrapper import Attachment
from ...targets import module_kind
from .fields import PeftField, expect, flat_state, module_tensors, peft_get
from .lora import FIELDS as LORA_FIELDS

PREFIX = "base_model.model."
_FACTORS = ("lora_A", "lora_E", "lora_B")  # the layer's state keys, and PEFT's names

# Every field of PEFT's AdaLoraConfig (LoraConfig's and AdaLoRA's own; PeftConfig's:
# fields.PEFT_BASE_FIELDS).
FIELDS: dict[str, PeftField] = {
    **LORA_FIELDS,
    "r": PeftField("supported", "unused by AdaLoRA (init_r is its rank)", "an integer", (int,)),
    "lora_alpha": PeftField("converted", "alpha", "a positive number", (int, float)),
    "lora_dropout": PeftField("converted", "dropout", "a number in [0, 1)", (int, float)),
    "use_rslora": PeftField(
        "supported", "unused by AdaLoRA (its scale is alpha/init_r)", "true or false", (bool,)
    ),
    "alpha_pattern": PeftField("supported", "unused by AdaLoRA", "an object", (dict,)),
    "use_dora": PeftField("refused", "PEFT's AdaLoRA refuses DoRA", "false", (bool,), (False,)),
    "rank_pattern": PeftField(
        "converted", "the triplets each module kept: kept_rank per module", "an object", (dict,)
    ),
    "target_r": PeftField("converted", "target_r", "a positive integer", (int,)),
    "init_r": PeftField("converted", "init_r", "a positive integer", (int,)),
    "tinit": PeftField("converted", "tinit", "an integer >= 0", (int,)),
    "tfinal": PeftField("converted", "tfinal", "an integer >= 0", (int,)),
    "deltaT": PeftField("converted", "delta_t", "a positive integer", (int,)),
    "beta1": PeftField("converted", "beta1", "a number in (0, 1)", (int, float)),
    "beta2": PeftField("converted", "beta2", "a number in (0, 1)", (int, float)),
    "orth_reg_weight": PeftField("converted", "orth_reg_weight", "a number >= 0", (int, float)),
    "total_step": PeftField("converted", "total_step", "a positive integer", (int,)),
}


def from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[AdaLoRA, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """PEFT's AdaLoRA: the factor triplets per module, pruned modules as ``kept_rank`` overrides."""
    factors = module_tensors(tensors, PREFIX, {f".{k}": k for k in _FACTORS}, "AdaLoRA")
    for path, found in factors.items():
        missing = sorted(set(_FACTORS) - set(found))
        if missing:
            raise ValueError(f"{path!r} lacks {missing}; AdaLoRA needs lora_A, lora_E and lora_B")
    method = AdaLoRA(
        init_r=int(peft_get(config, "init_r", 12)),
        target_r=int(peft_get(config, "target_r", 8)),
        alpha=float(peft_get(config, "lora_alpha", 8)),
        dropout=float(peft_get(config, "lora_dropout", 0.0)),
        tinit=int(peft_get(config, "tinit", 0)),
        tfinal=int(peft_get(config, "tfinal", 0)),
        delta_t=int(peft_get(config, "deltaT", 1)),
        beta1=float(peft_get(config, "beta1", 0.85)),
        beta2=float(peft_get(config, "beta2", 0.85)),
        orth_reg_weight=float(peft_get(config, "orth_reg_weight", 0.5)),
        total_step=config.get("total_step"),
    )
    overrides: dict[str, dict[str, Any]] = {}
    for path, found in factors.items():
        rank = int(found["lora_A"].shape[0])
        if rank != method.init_r:
            overrides["^" + re.escape(path) + "$"] = {"kept_rank": rank}
    return method, list(factors), overrides, flat_state(factors)


def to_peft(
    method: Method, attachment: Attachment, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's AdaLoraConfig and tensors; a pruned module's kept triplets as a ``rank_pattern``."""
    adalora = expect(method, AdaLoRA)
    info = attachment.info(name)
    if adalora.total_step is None:
        raise ValueError(
            "AdaLoRA.total_step is None, and PEFT's AdaLoraConfig requires total_step > 0; set it "
            "(dataclasses.replace) or fit the method with for_steps before exporting"
        )
    state = adapter_state(attachment.model, name)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, list[bool]] = {}
    kinds = set()
    for path in info.targets:
        cfg = expect(info.configs[path], AdaLoRA)
        for f in dataclasses.fields(cfg):
            if f.name != "kept_rank" and getattr(cfg, f.name) != getattr(adalora, f.name):
                raise ValueError(f"{path!r} overrides {f.name}, which PEFT's AdaLoRA cannot express")
        for key in _FACTORS:
            tensors[f"{PREFIX}{path}.{key}"] = state[f"{path}.{key}"]
        kept = int(state[f"{path}.lora_A"].shape[0])
        rank_pattern[f"{path}.lora_E"] = [True] * kept + [False] * (adalora.init_r - kept)
        kinds.add(module_kind(attachment.wrappers[path].base))
    pruned = any(not all(pattern) for pattern in rank_pattern.values())
    return {
        "init_r": adalora.init_r,
        "target_r": adalora.target_r,
        "lora_alpha": adalora.alpha,
        "lora_dropout": adalora.dropout,
        "tinit": adalora.tinit,
        "tfinal": adalora.tfinal,
        "deltaT": adalora.delta_t,
        "beta1": adalora.beta1,
        "beta2": adalora.beta2,
        "orth_reg_weight": adalora.orth_reg_weight,
        "total_step": adalora.total_step,
        "rank_pattern": rank_pattern if pruned else None,
        "target_modules": sorted(info.targets),
        "fan_in_fan_out": "conv1d" in kinds,
        "init_lora_weights": True,
        "bias": "none",
    }, tensors
