"""PEFT's adapter format at the boundary: :func:`import_peft` and :func:`export_peft`.

This module names no method. It reads PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``,
finds the translator of the file's ``peft_type`` (:data:`deltatune.formats.peft.TRANSLATORS`, where
PEFT translation lives: one module per type) and lets it translate the config fields and tensors;
what every PEFT adapter shares (the files, ``modules_to_save``, ``task_type``,
``base_model_name_or_path``, ``inference_mode``) is handled here. Only safetensors files are read:
nothing is unpickled.

Example:
    >>> import copy, tempfile, torch
    >>> from torch import nn
    >>> from deltatune import LoRA, inject, export_peft, import_peft
    >>> net = nn.Sequential(nn.Linear(8, 8))
    >>> fresh = copy.deepcopy(net)
    >>> _ = inject(net, LoRA(rank=2), targets=["0"])
    >>> folder = export_peft(net, tempfile.mkdtemp())
    >>> sorted(p.name for p in folder.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    >>> att = import_peft(fresh, folder)
    >>> x = torch.randn(2, 8)
    >>> torch.equal(fresh(x), net(x))
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ... import contract
from ...runtime import checks, wrapper
from ...runtime.state import adapter_state
from ...targets import name_matches
from .. import files, io, tensorfile
from . import BY_METHOD, TRANSLATORS, translator_of
from .fields import check_peft_config

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def import_peft(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    name: str = "default",
    trainable: bool = False,
    unknown_fields: Literal["refuse", "ignore"] = "refuse",
) -> wrapper.Attachment:
    """Load an adapter saved by PEFT (``adapter_config.json`` + ``adapter_model.safetensors``).

    The translator of the file's ``peft_type`` reads it (see the module docstring);
    :data:`deltatune.formats.peft.TRANSLATORS` lists them. ``modules_to_save`` copies load as
    deltatune's.

    Args:
        name: the adapter's name on this model.
        trainable: leave the loaded adapter's parameters trainable (default: frozen, for inference).
        unknown_fields: "refuse" (default) a config field that the translator's ``fields`` table
            does not list (a newer PEFT's), or "ignore" it.

    Raises:
        ValueError: no PEFT files, an unsupported ``peft_type`` or option (named), tensors for
            modules the model does not have, missing/extra/mis-shaped tensors. The model is left as
            it was.
    """
    folder = Path(folder)
    cfg_path = folder / PEFT_CONFIG_NAME
    if unknown_fields not in ("refuse", "ignore"):
        raise ValueError(f"import_peft: unknown_fields={unknown_fields!r}; expected 'refuse' or 'ignore'")
    # Both files of one version of the folder, even while another process saves it again.
    found = io.read_files(folder, [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME], "PEFT adapter")
    try:
        config = json.loads(found[PEFT_CONFIG_NAME])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e}); expected PEFT's adapter config") from e
    if not isinstance(config, dict):
        raise ValueError(
            f"{cfg_path}: a JSON {type(config).__name__}; expected a JSON object (PEFT's adapter config)"
        )
    kind = config.get("peft_type")
    if kind is None and config.get("library") == "deltatune":
        raise ValueError(
            f"{cfg_path}: a deltatune adapter, not a PEFT one (no peft_type); load it with deltatune.load"
        )
    if kind not in TRANSLATORS:
        raise ValueError(f"{cfg_path}: peft_type {kind!r} is not supported; supported: {sorted(TRANSLATORS)}")
    translator = TRANSLATORS[kind]
    if translator.fields is not None:
        check_peft_config(config, translator.fields, str(cfg_path), unknown_fields=unknown_fields)
    weights = folder / PEFT_WEIGHTS_NAME
    if found[PEFT_WEIGHTS_NAME] is None:
        raise ValueError(f"{folder}: no {PEFT_WEIGHTS_NAME} (only safetensors adapters are read)")
    tensors = tensorfile.tensors(found[PEFT_WEIGHTS_NAME], weights)
    modules = wrapper.base_modules(model, model.__dict__.get(wrapper.ATTACHMENT_ATTR))
    saved, save_paths, rest = _modules_to_save(modules, config, tensors, translator.prefix)
    _check_foreign_heads(model, modules, config, rest, translator.prefix, weights)
    try:
        method, targets, overrides, state = translator.from_peft(config, rest, model)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from e
    missing = sorted(set(targets) - set(modules))
    if missing:
        raise ValueError(
            f"{weights}: the model has no module(s) {checks.few(missing)}; was it saved for another model?"
        )
    order = {path: i for i, path in enumerate(modules)}
    return io.inject_filled(
        model,
        method,
        {**state, **saved},
        str(weights),
        trainable=trainable,
        targets=sorted(targets, key=order.__getitem__),
        name=name,
        overrides=overrides,
        modules_to_save=save_paths,
    )


def _check_foreign_heads(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    config: Mapping[str, Any],
    rest: Mapping[str, torch.Tensor],
    prefix: str,
    weights: Path,
) -> None:
    """A ``modules_to_save`` tensor whose module the model lacks (a task head on a bare model)."""
    absent = [
        n for n in config.get("modules_to_save") or [] if not any(p and name_matches(p, n) for p in modules)
    ]
    for key in rest:
        local = key[len(prefix) :] if key.startswith(prefix) else key
        for save in absent:
            if f".{save}." in f".{local}":
                raise ValueError(
                    f"{weights}: tensor {key!r} belongs to modules_to_save {save!r}, which "
                    f"{type(model).__name__} does not have (task_type {config.get('task_type')!r}); "
                    "load the model with that task's head (e.g. AutoModelForSequenceClassification "
                    "for SEQ_CLS) and import onto it"
                )


def _modules_to_save(
    modules: Mapping[str, nn.Module],
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, torch.Tensor]]:
    """Take the ``modules_to_save`` copies out of PEFT's tensors: ``<prefix><path>.<param>`` of a
    module named in ``config["modules_to_save"]`` (PEFT strips its wrapper) becomes deltatune's
    ``<path>.module.<param>``. Returns (those, their module paths in model order, the other tensors)."""
    names = list(config.get("modules_to_save") or [])
    owners = {
        path: set(module.state_dict())
        for path, module in modules.items()
        if path and any(name_matches(path, n) for n in names)
    }
    saved: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        local = key[len(prefix) :] if key.startswith(prefix) else ""
        inside = [p for p in owners if local.startswith(p + ".") and local[len(p) + 1 :] in owners[p]]
        owner = max(inside, key=len, default=None)
        if owner is None:
            rest[key] = value
        else:
            saved[f"{owner}.module.{local[len(owner) + 1 :]}"] = value
    paths = [p for p in owners if any(k.startswith(p + ".module.") for k in saved)]
    return saved, paths, rest


def module_copies(model: nn.Module, name: str, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter's ``modules_to_save`` copies under PEFT's names: deltatune's
    ``"<path>.module.<param>"`` is PEFT's ``"<prefix><path>.<param>"``."""
    info = wrapper.attachment_of(model).info(name)
    state = adapter_state(model, name)
    out: dict[str, torch.Tensor] = {}
    for path in info.modules_to_save:
        copy = f"{path}.module."
        for key in (k for k in state if k.startswith(copy)):
            out[f"{prefix}{path}.{key[len(copy) :]}"] = state[key]
    return out


#: The heads PEFT's sequence classifiers train along (PeftModelForSequenceClassification's names).
PEFT_CLASSIFIERS = ("classifier", "score")


def _classifier_for_peft(
    model: nn.Module, saved: list[str], prefix: str, tensors: dict[str, torch.Tensor]
) -> list[str]:
    """PEFT's prompt learning in a sequence classifier always loads the classifier from the file
    (PEFT raises ``KeyError: 'base_model.classifier.weight'`` without it): when the adapter did not
    save the head, write the model's own head as the copy PEFT reads, which is exact (its values are
    the base's). Returns the path added (or nothing)."""
    if any(name_matches(p, c) for p in saved for c in PEFT_CLASSIFIERS):
        return []
    modules = dict(model.named_modules())
    path = next((c for c in PEFT_CLASSIFIERS if c in modules), None)
    if path is None:
        raise ValueError(
            "export_peft: PEFT's sequence classification loads its head ('classifier' or 'score') from "
            f"the file, and {type(model).__name__} has neither; pass task_type= for the model's task"
        )
    for key, value in modules[path].state_dict().items():
        tensors[f"{prefix}{path}.{key}"] = value.detach().clone()
    return [path]


def export_peft(
    model: nn.Module,
    folder: str | os.PathLike[str],
    adapter: str | None = None,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write an adapter in PEFT's format, so that ``peft.PeftModel.from_pretrained`` loads it.

    Args:
        adapter: which adapter (default: the first active one).
        base_model_name_or_path: recorded in the config, as PEFT does.
        task_type: PEFT's task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...); prompt-learning methods
            read it off the model when it is not given (PEFT needs it to run them).

    Returns:
        The folder, holding ``adapter_config.json`` and ``adapter_model.safetensors``.

    Raises:
        ValueError: the method has no PEFT mapping, or uses something PEFT cannot load or would
            compute differently (named).
    """
    att = wrapper.attachment_of(model)
    name = adapter if adapter is not None else (att.active[0] if att.active else next(iter(att.adapters)))
    info = att.info(name)
    translator = translator_of(info.method)
    if translator is None:
        raise ValueError(
            f"export_peft: {name!r} is {type(info.method).__name__}, which has no mapping to PEFT's "
            f"format; these have one: {sorted(contract.REGISTRY[m].__name__ for m in BY_METHOD)}"
        )
    try:
        config, tensors = translator.to_peft(info.method, att, name)
    except ValueError as e:
        raise ValueError(f"export_peft: {e}") from e
    task = task_type if task_type is not None else config.get("task_type")
    if task is None and "task_type" in config:  # the method needs one and could not read it off
        raise ValueError(
            f"export_peft: PEFT runs {type(info.method).__name__} only inside the PeftModel of a task, and "
            f"{type(model).__name__} names none; pass task_type= ('SEQ_CLS', 'CAUSAL_LM', ...)"
        )
    prefix = translator.prefix
    tensors.update(module_copies(model, name, prefix))
    saved = list(info.modules_to_save)
    if task == "SEQ_CLS" and prefix == "base_model.":
        saved += _classifier_for_peft(model, saved, prefix, tensors)
    config = {
        **config,
        "peft_type": translator.peft_type,
        "task_type": task,
        "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": saved or None,
        "inference_mode": True,
    }
    folder = Path(folder)
    files.write_files(
        folder,
        {
            PEFT_CONFIG_NAME: files.json_writer(config),
            PEFT_WEIGHTS_NAME: files.tensors_writer(tensors, metadata={"format": "pt"}),
        },
    )
    return folder
