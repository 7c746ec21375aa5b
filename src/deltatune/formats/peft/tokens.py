"""PEFT's ``TRAINABLE_TOKENS`` type: deltatune's :class:`TrainableTokens`.

PEFT stores, per adapted module, ``trainable_tokens_delta``: the new rows of the tokens
(``token_indices``), not differences. A head tied to the embedding gets the same rows under its own
name (PEFT adapts it as the embedding's "tied adapter", without listing it in ``target_modules``);
deltatune keeps one shared parameter per distinct weight (``deltatune_shared.rows_<i>``, in model
order), so a tied pair imports as one set of rows, and must hold the same values twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...contract import SHARED_ATTR, Method
from ...methods.selective.tokens import TokenRowsLayer, TrainableTokens, row_keys, rows_of
from ...runtime.wrapper import ATTACHMENT_ATTR, Attachment, base_modules
from .fields import PEFT_TUNER_FIELDS, PeftField, expect

PREFIX = "base_model.model."
_DELTA = ".trainable_tokens_delta"

# Every field of PEFT's TrainableTokensConfig (PeftConfig's own: fields.PEFT_BASE_FIELDS).
FIELDS: dict[str, PeftField] = {
    "token_indices": PeftField("converted", "token_ids", "a list of token ids", (list,), required=True),
    "target_modules": PEFT_TUNER_FIELDS["target_modules"],
    "init_weights": PeftField(
        "supported", "init-time only: the file holds the rows", "true or false", (bool,)
    ),
}


def _weight_keys(model: nn.Module, paths: list[str]) -> dict[str, str]:
    """path -> the shared key of its weight's rows, as :class:`TokenRows` will number them."""
    modules = base_modules(model, model.__dict__.get(ATTACHMENT_ATTR))
    return dict(zip(paths, row_keys([rows_of(modules[p]) for p in paths]), strict=True))


def from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[TrainableTokens, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """PEFT's trainable tokens: the rows of every module with a ``trainable_tokens_delta``."""
    ids = config.get("token_indices")
    if not isinstance(ids, list) or not ids:
        raise ValueError(f"token_indices must be a non-empty list of token ids, got {ids!r}")
    rows: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not (key.startswith(PREFIX) and key.endswith(_DELTA)):
            raise ValueError(f"unexpected tensor {key!r}: neither trainable tokens' nor in modules_to_save")
        rows[key[len(PREFIX) : -len(_DELTA)]] = value
    if not rows:
        raise ValueError("holds no trainable_tokens_delta tensors")
    modules = base_modules(model, model.__dict__.get(ATTACHMENT_ATTR))
    missing = sorted(set(rows) - set(modules))
    if missing:
        raise ValueError(f"the model has no module(s) {missing[:4]}; was it saved for another model?")
    paths = [p for p in modules if p in rows]
    keys = _weight_keys(model, paths)
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        value = rows[path]
        if value.shape[0] != len(ids):
            raise ValueError(f"{path!r}: {value.shape[0]} rows for {len(ids)} token_indices")
        key = f"{SHARED_ATTR}.{keys[path]}"
        if key in state and not torch.equal(state[key], value):
            raise ValueError(f"{path!r} shares its weight with another target, but the file's rows differ")
        state[key] = value
    return TrainableTokens(token_ids=tuple(int(i) for i in ids)), paths, {}, state


def to_peft(
    method: Method, attachment: Attachment, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's config and rows: every adapted module's rows under its name; ``target_modules`` lists
    the modules whose weight no earlier target shares (PEFT follows a tied head by itself)."""
    tokens = expect(method, TrainableTokens)
    info = attachment.info(name)
    shared = attachment.shared(name)
    if shared is None:
        raise ValueError(f"adapter {name!r} has no token rows")
    paths = list(info.targets)
    keys = {
        path: layer.key
        for path, layer in attachment.layers(name).items()
        if isinstance(layer, TokenRowsLayer)
    }
    # (a copy each: safetensors refuses two names for one storage, as a tied pair would give)
    tensors = {f"{PREFIX}{path}{_DELTA}": getattr(shared, keys[path]).detach().clone() for path in paths}
    first = {key: path for path, key in reversed(keys.items())}
    config = {
        "token_indices": list(tokens.token_ids),
        "target_modules": sorted(first.values()),
        "init_weights": True,
    }
    return config, tensors
