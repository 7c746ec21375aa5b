"""PEFT's adapter format at the boundary: :func:`import_peft` and :func:`export_peft`.

This module names no method. It reads PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``,
finds the registered method that declares the file's ``peft_type``, and lets that method translate
its own config fields and tensors; what every PEFT adapter shares (the files, ``modules_to_save``,
``task_type``, ``base_model_name_or_path``, ``inference_mode``) is handled here. Only safetensors
files are read: nothing is unpickled.

A method takes part in PEFT's format by declaring, in its own file, these four hooks (all or none):

* ``peft_type: ClassVar[str]``: the ``peft_type`` it reads and writes (``"LORA"``,
  ``"PROMPT_TUNING"``, ...); one registered method per type reads it. A method that PEFT stores as
  a variant of another's type (DoRA: PEFT's LoRA with ``use_dora``) also declares
  ``peft_flag = "use_dora"``: it reads the files of that type whose config sets the flag, the plain
  method the others (:func:`peft_reader`; the plain method's ``peft_fields`` check both).
* ``peft_prefix: ClassVar[str]``: how PEFT's tensor names of this type spell the base model's
  modules: ``"base_model.model."`` for PEFT's tuners (LoRA, VB-LoRA), ``"base_model."`` for its
  prompt-learning methods. Used here for the ``modules_to_save`` copies, and by the method's names.
* ``from_peft(config, tensors, model) -> (method, targets, overrides, state)``, a classmethod:
  ``config`` is PEFT's ``adapter_config.json``; ``tensors`` the file's tensors under PEFT's names,
  the ``modules_to_save`` copies already taken out. Returns the method config, the module paths it
  adapts, per-module field overrides, and the adapter's tensors named as
  :func:`deltatune.state.adapter_state` names them (``"<path>.<key>"``, ``"deltatune_shared.<key>"``).
  A PEFT option it cannot represent is a ``ValueError`` naming it (prefixed here with the file).
* ``to_peft(attachment, name) -> (config, tensors)``: the method's part of PEFT's config and its
  tensors under PEFT's names (without ``modules_to_save`` copies: added here, as are ``peft_type``,
  ``base_model_name_or_path``, ``modules_to_save`` and ``inference_mode``). A method that PEFT runs
  only inside the PeftModel of a task (prompt learning) sets ``task_type``, read off the model, or
  None when it cannot tell, which makes the caller's ``task_type`` required; the caller's wins.
  Anything PEFT cannot load, or would compute differently, is a ``ValueError``.

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
from typing import Any, ClassVar, Literal, Protocol, cast

import torch
from torch import nn

from . import checks, contract, files, io, tensorfile, wrapper
from .interop import PeftField
from .state import adapter_state
from .targets import name_matches

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


# PeftConfig's own fields (every PEFT config has them): handled here, for every method.
PEFT_BASE_FIELDS: dict[str, PeftField] = {
    "peft_type": PeftField(
        "supported", "chooses the method (peft_methods())", "a string", (str,), required=True
    ),
    "task_type": PeftField("supported", "PEFT's task; no effect on the tensors", "a string", (str,)),
    "auto_mapping": PeftField("supported", "PEFT's base-class bookkeeping; no effect", "an object", (dict,)),
    "peft_version": PeftField("supported", "the PEFT version that saved it; no effect", "a string", (str,)),
    "base_model_name_or_path": PeftField("supported", "informative only", "a string", (str,)),
    "revision": PeftField("supported", "the base model's revision; informative only", "a string", (str,)),
    "inference_mode": PeftField("supported", "see import_peft's trainable=", "true or false", (bool,)),
}


def check_peft_config(
    config: Mapping[str, Any],
    table: Mapping[str, PeftField],
    where: str,
    *,
    unknown_fields: Literal["refuse", "ignore"] = "refuse",
) -> None:
    """Check every field of PEFT's ``config`` against a method's table (and :data:`PEFT_BASE_FIELDS`).

    Raises:
        ValueError: a required field missing, a value of the wrong type or refused (naming the
            field and what would import), or fields the table does not know (unless ignored).
    """
    fields = {**PEFT_BASE_FIELDS, **table}
    unknown = sorted(set(config) - set(fields))
    if unknown and unknown_fields != "ignore":
        raise ValueError(
            f"{where}: field(s) {checks.few(unknown)} unknown to deltatune's import (saved by a newer "
            "PEFT?); what they change cannot be checked, so the adapter is refused; pass "
            "unknown_fields='ignore' to import it without them"
        )
    for key, field in fields.items():
        value = config.get(key)
        if value is None:
            if field.required:
                raise ValueError(f"{where}: field {key!r} is missing; expected {field.expected}")
            continue
        wrong_type = not isinstance(value, field.types) or (
            isinstance(value, bool) and bool not in field.types
        )
        if wrong_type:
            raise ValueError(f"{where}: field {key!r} is {value!r}; expected {field.expected}")
        if field.accepts is not None and value not in field.accepts:
            raise ValueError(
                f"{where}: {key}={value!r} is not supported by import_peft ({field.why}); "
                f"expected {field.expected}"
            )


class PeftMapping(Protocol):
    """The hooks of a method that reads and writes PEFT's format (see the module docstring)."""

    peft_type: ClassVar[str]
    peft_prefix: ClassVar[str]

    @classmethod
    def from_peft(
        cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
    ) -> tuple[Any, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]: ...

    def to_peft(
        self, attachment: wrapper.Attachment, name: str
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...


def peft_methods() -> dict[str, type[PeftMapping]]:
    """PEFT's ``peft_type`` -> the registered method that reads its plain files (not a variant flag's)."""
    out: dict[str, type[PeftMapping]] = {}
    for cls in contract.REGISTRY.values():  # every registered class has every hook (contract.hooks)
        kind = cls.peft_type  # None (register's default): the method has no PEFT mapping
        if kind is None or getattr(cls, "peft_flag", None):  # a variant: peft_reader picks it
            continue
        if kind in out:
            raise ValueError(f"{out[kind].__name__} and {cls.__name__} both declare peft_type {kind!r}")
        out[kind] = cast("type[PeftMapping]", cls)
    return out


def peft_reader(kind: str, config: Mapping[str, Any]) -> type[PeftMapping]:
    """The registered method that reads a PEFT file of ``peft_type`` ``kind`` with ``config``: the
    one declaring a ``peft_flag`` the config sets (DoRA for ``use_dora``), else the plain one."""
    for cls in contract.REGISTRY.values():
        flag = getattr(cls, "peft_flag", None)
        if cls.peft_type == kind and flag and config.get(flag):
            return cast("type[PeftMapping]", cls)
    return peft_methods()[kind]


def import_peft(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    name: str = "default",
    trainable: bool = False,
    unknown_fields: Literal["refuse", "ignore"] = "refuse",
) -> wrapper.Attachment:
    """Load an adapter saved by PEFT (``adapter_config.json`` + ``adapter_model.safetensors``).

    The registered method that declares the file's ``peft_type`` translates it (see the module
    docstring); :func:`peft_methods` lists them. ``modules_to_save`` copies load as deltatune's.

    Args:
        name: the adapter's name on this model.
        trainable: leave the loaded adapter's parameters trainable (default: frozen, for inference).
        unknown_fields: "refuse" (default) a config field that the method's ``peft_fields`` table
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
    methods = peft_methods()
    kind = config.get("peft_type")
    if kind is None and config.get("library") == "deltatune":
        raise ValueError(
            f"{cfg_path}: a deltatune adapter, not a PEFT one (no peft_type); load it with deltatune.load"
        )
    if kind not in methods:
        raise ValueError(f"{cfg_path}: peft_type {kind!r} is not supported; supported: {sorted(methods)}")
    cls = peft_reader(kind, config)
    table = cast("Mapping[str, PeftField] | None", getattr(methods[kind], "peft_fields", None))
    if table is not None:
        check_peft_config(config, table, str(cfg_path), unknown_fields=unknown_fields)
    weights = folder / PEFT_WEIGHTS_NAME
    if found[PEFT_WEIGHTS_NAME] is None:
        raise ValueError(f"{folder}: no {PEFT_WEIGHTS_NAME} (only safetensors adapters are read)")
    tensors = tensorfile.tensors(found[PEFT_WEIGHTS_NAME], weights)
    modules = wrapper.base_modules(model, model.__dict__.get(wrapper.ATTACHMENT_ATTR))
    saved, save_paths, rest = _modules_to_save(modules, config, tensors, cls.peft_prefix)
    _check_foreign_heads(model, modules, config, rest, cls.peft_prefix, weights)
    try:
        method, targets, overrides, state = cls.from_peft(config, rest, model)
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
    methods = peft_methods()
    kind = contract.hooks(info.method).peft_type
    if kind not in methods:
        raise ValueError(
            f"export_peft: {name!r} is {type(info.method).__name__}, which has no mapping to PEFT's "
            f"format; these have one: {sorted(m.__name__ for m in methods.values())}"
        )
    mapping = cast("PeftMapping", info.method)  # it declares peft_type: it has the four hooks
    try:
        config, tensors = mapping.to_peft(att, name)
    except ValueError as e:
        raise ValueError(f"export_peft: {e}") from e
    task = task_type if task_type is not None else config.get("task_type")
    if task is None and "task_type" in config:  # the method needs one and could not read it off
        raise ValueError(
            f"export_peft: PEFT runs {type(mapping).__name__} only inside the PeftModel of a task, and "
            f"{type(model).__name__} names none; pass task_type= ('SEQ_CLS', 'CAUSAL_LM', ...)"
        )
    prefix = mapping.peft_prefix
    state = adapter_state(model, name)
    for path in info.modules_to_save:  # deltatune's "<path>.module.<param>" is PEFT's "<path>.<param>"
        copy = f"{path}.module."
        for key in (k for k in state if k.startswith(copy)):
            tensors[f"{prefix}{path}.{key[len(copy) :]}"] = state[key]
    config = {
        **config,
        "peft_type": mapping.peft_type,
        "task_type": task,
        "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": list(info.modules_to_save) or None,
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
