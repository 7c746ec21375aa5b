"""PEFT's ``VERA`` type: deltatune's VeRA (per module its two vectors; the shared projections when
the file holds them, as PEFT's default ``save_projection=True`` writes them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...contract import SHARED_ATTR, Method
from ...methods.lowrank.vera import Projections, VeRA
from ...runtime.wrapper import Attachment
from .fields import PEFT_TUNER_FIELDS, PeftField, expect, flat_state, module_tensors, peft_get, tuner_to_peft

PREFIX = "base_model.model."

# PEFT's tensor names -> ours.
_NAMES = {".vera_lambda_b": "lambda_b", ".vera_lambda_d": "lambda_d"}
_PROJECTIONS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}

# Every field of PEFT's VeraConfig (PeftConfig's own: fields.PEFT_BASE_FIELDS).
FIELDS: dict[str, PeftField] = {
    "r": PeftField("converted", "rank", "a positive integer", (int,)),
    "d_initial": PeftField("converted", "d_initial (init-time only)", "a number", (int, float)),
    "vera_dropout": PeftField("converted", "dropout", "a number in [0, 1)", (int, float)),
    "projection_prng_key": PeftField("converted", "projection_prng_key", "a non-negative integer", (int,)),
    "save_projection": PeftField(
        "converted",
        "save_projection, read off the tensors: projections in the file are used as they are",
        "true or false",
        (bool,),
    ),
    "init_weights": PeftField(
        "supported", "init-time only: the file holds the vectors", "true or false", (bool,)
    ),
    # where the adapter goes: shared by PEFT's layer tuners (VeraConfig has no exclude_modules)
    **{k: f for k, f in PEFT_TUNER_FIELDS.items() if k != "exclude_modules"},
    "bias": PeftField("refused", "deltatune's VeRA trains no biases", "'none'", (str,), ("none",)),
}


def from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[VeRA, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """PEFT's VeRA: per module its two vectors, and the shared pair when the file holds it."""
    shared = {f"{SHARED_ATTR}.{_PROJECTIONS[k]}": v for k, v in tensors.items() if k in _PROJECTIONS}
    factors = module_tensors(
        {k: v for k, v in tensors.items() if k not in _PROJECTIONS}, PREFIX, _NAMES, "VeRA"
    )
    held = sorted(shared)
    if held and len(held) != 2:
        raise ValueError(f"holds only {held[0].split('.')[-1]} of the shared pair vera_A, vera_B")
    if config.get("save_projection") and not held:
        raise ValueError("save_projection is true but the file holds no vera_A / vera_B")
    method = VeRA(
        rank=int(peft_get(config, "r", 256)),
        d_initial=float(peft_get(config, "d_initial", 0.1)),
        dropout=float(peft_get(config, "vera_dropout", 0.0)),
        projection_prng_key=int(peft_get(config, "projection_prng_key", 0)),
        save_projection=bool(held),
    )
    return method, list(factors), {}, {**shared, **flat_state(factors)}


def to_peft(
    method: Method, attachment: Attachment, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's VeRA config and tensors, with the shared pair (``save_projection=True``: PEFT then
    loads the very projections used here)."""
    vera = expect(method, VeRA)
    placement, tensors = tuner_to_peft(vera, attachment, name, PREFIX, _NAMES, "VeRA")
    shared = attachment.shared(name)
    if not isinstance(shared, Projections):
        raise ValueError(f"adapter {name!r} has no VeRA projections")
    for peft_key, ours in _PROJECTIONS.items():
        tensors[peft_key] = getattr(shared, ours).detach().contiguous()
    config = {
        "r": vera.rank,
        "d_initial": vera.d_initial,
        "vera_dropout": vera.dropout,
        "projection_prng_key": vera.projection_prng_key,
        "save_projection": True,
        "init_weights": True,
        **placement,
        "bias": "none",
    }
    return config, tensors
