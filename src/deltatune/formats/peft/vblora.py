"""PEFT's ``VBLORA`` type: deltatune's VB-LoRA (the bank, and per module its logits or PEFT's top-k
form, which loads as trainable logits here; PEFT's own loader refuses to train it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...contract import SHARED_ATTR, Method
from ...methods.lowrank.vblora import VBLoRA
from ...runtime.wrapper import Attachment
from .fields import PEFT_TUNER_FIELDS, PeftField, expect, flat_state, module_tensors, peft_get, tuner_to_peft

PREFIX = "base_model.model."

# PEFT's tensor suffixes (longest first) -> the layer's state keys; PEFT's name of the bank.
_NAMES = {
    ".vblora_logits_A_topk_indices": "topk_indices_A",
    ".vblora_logits_A_topk_weights": "topk_weights_A",
    ".vblora_logits_B_topk_indices": "topk_indices_B",
    ".vblora_logits_B_topk_weights": "topk_weights_B",
    ".vblora_logits_A": "logits_A",
    ".vblora_logits_B": "logits_B",
}
_BANK = "base_model.vblora_vector_bank"

# Every field of PEFT's VBLoRAConfig (PeftConfig's own: fields.PEFT_BASE_FIELDS); checked by
# import_peft before from_peft runs. A test walks it against the installed PEFT.
FIELDS: dict[str, PeftField] = {
    "r": PeftField("converted", "rank", "a positive integer (the rank r)", (int,), required=True),
    "num_vectors": PeftField(
        "converted", "num_vectors", "an integer >= 2 (the vectors in the bank)", (int,), required=True
    ),
    "vector_length": PeftField(
        "converted",
        "vector_length",
        "a positive integer (the bank vectors' length)",
        (int,),
        required=True,
    ),
    "topk": PeftField("converted", "topk", "a positive integer", (int,)),
    "vblora_dropout": PeftField("converted", "dropout", "a number in [0, 1)", (int, float)),
    "init_logits_std": PeftField("converted", "logits_std", "a positive number", (int, float)),
    "init_vector_bank_bound": PeftField("converted", "bank_bound", "a positive number", (int, float)),
    "save_only_topk_weights": PeftField(
        "converted", "save_mode, read off the tensors (top-k or logits)", "true or false", (bool,)
    ),
    **PEFT_TUNER_FIELDS,  # where the adapter goes: shared by PEFT's layer tuners
    "bias": PeftField("refused", "deltatune's VB-LoRA trains no biases", "'none'", (str,), ("none",)),
}


def from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[VBLoRA, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """PEFT's VB-LoRA: the bank, and per module its logits or its top-k form."""
    bank = {f"{SHARED_ATTR}.bank": v for k, v in tensors.items() if k.startswith(_BANK)}
    factors = module_tensors(
        {k: v for k, v in tensors.items() if not k.startswith(_BANK)}, PREFIX, _NAMES, "VB-LoRA"
    )
    state = {**bank, **flat_state(factors)}
    method = VBLoRA(
        rank=int(config["r"]),
        num_vectors=int(config["num_vectors"]),
        vector_length=int(config["vector_length"]),
        topk=int(peft_get(config, "topk", 2)),
        logits_std=float(peft_get(config, "init_logits_std", 0.1)),
        bank_bound=float(peft_get(config, "init_vector_bank_bound", 0.02)),
        dropout=float(peft_get(config, "vblora_dropout", 0.0)),
        save_mode="topk" if any(k.endswith(".topk_indices_A") for k in state) else "logits",
    )
    return method, list(factors), {}, state


def to_peft(
    method: Method, attachment: Attachment, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's VB-LoRA config and tensors, in the save mode of this config (top-k or logits)."""
    vblora = expect(method, VBLoRA)
    shared = {f"{SHARED_ATTR}.bank": _BANK}
    placement, tensors = tuner_to_peft(vblora, attachment, name, PREFIX, _NAMES, "VB-LoRA", shared)
    config = {
        "r": vblora.rank,
        "num_vectors": vblora.num_vectors,
        "vector_length": vblora.vector_length,
        "topk": vblora.topk,
        "vblora_dropout": vblora.dropout,
        "init_logits_std": vblora.logits_std,
        "init_vector_bank_bound": vblora.bank_bound,
        "save_only_topk_weights": vblora.save_mode == "topk",
        **placement,
        "bias": "none",
    }
    return config, tensors
