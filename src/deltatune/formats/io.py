"""Adapter files: ``adapter_config.json`` + ``adapter.safetensors``.

PEFT's format is :mod:`deltatune.formats.peft`.

Only JSON and safetensors are ever read: nothing is unpickled. Writes go to a temporary folder that
is swapped whole for the old one (:func:`deltatune.formats.files.write_folder`), so a crash leaves the old
adapter or the new one, never a half-written or mixed one. Loading checks the format version, the
method and its fields, the base model's fingerprint (class, weight shape and a sampled hash of the
weight of every adapted module: another base is refused unless ``load(..., strict_base=False)``),
and every tensor's name and shape, and names whatever is missing, extra or mismatched.

The config also records the base model the adapter belongs on, so that ``deltatune eval ADAPTER``
and ``deltatune merge ADAPTER --out DIR`` need no ``--model`` (``null`` or absent in format-1 files):

* ``base_model``: the model to load it onto: an alias (``"minilm"``), a local folder (absolute
  path) or a hub name. Taken from ``save(base_model=...)``, else from :func:`deltatune.train.models.
  load_model`'s tag, else from a transformers model's ``config.name_or_path``.
* ``extra``: the caller's own metadata (``save(..., extra={"harness": {...}})``), stored as given
  and read back as stored; the library checks only that it is JSON. The training harness keeps the
  head and task it trained with there (:mod:`deltatune.train.provenance`); format-1 and format-2
  files held them as top-level ``head`` and ``task`` keys, which :func:`parse_config` hands over as
  ``extra["harness"]``.

Files are created with the permissions ``open()`` would give them (``0o666 & ~umask``; folders
``0o777 & ~umask``), not the private modes of temporary files (safetensors >= 0.8 writes through
a ``0o600`` temporary file; ``tempfile.mkdtemp`` makes ``0o700`` folders).

Example:
    >>> import copy, tempfile, torch
    >>> from torch import nn
    >>> from deltatune import LoRA, inject, save, load
    >>> net = nn.Sequential(nn.Linear(8, 8))
    >>> fresh = copy.deepcopy(net)  # the same base model, loaded again elsewhere
    >>> _ = inject(net, LoRA(rank=2), targets=["0"])
    >>> folder = save(net, tempfile.mkdtemp())
    >>> sorted(p.name for p in folder.iterdir())
    ['adapter.safetensors', 'adapter_config.json']
    >>> _ = load(fresh, folder)
    >>> x = torch.randn(2, 8)
    >>> torch.equal(fresh(x), net(x))
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import contract
from ..contract.fields import from_jsonable, to_jsonable
from ..runtime import checks, core, quantized_base, wrapper
from ..runtime.fingerprint import check_fingerprint, fingerprint
from ..runtime.state import adapter_state, load_adapter_state
from . import tensorfile
from .files import json_writer, read_folder, tensors_writer, write_files

# 2 adds the optional base_model, head and task records; 3 moves head and task into extra["harness"]
# (the harness's, not the library's). Files of formats 1 and 2 still load.
FORMAT_VERSION = 3
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"

#: Attribute that :func:`deltatune.train.models.load_model` sets on the models it loads: the alias,
#: absolute local path or hub name it loaded, which :func:`save` records as ``base_model``.
BASE_MODEL_ATTR = "deltatune_base_model"
#: The section of ``extra`` that format-1 and format-2 files' top-level ``head`` and ``task`` keys
#: (the training harness's records, :mod:`deltatune.train.provenance`) are read into.
HARNESS_SECTION = "harness"
_HARNESS_KEYS = ("head", "task")


def save(
    model: nn.Module,
    folder: str | os.PathLike[str],
    adapter: str | None = None,
    *,
    base_model: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save one adapter (default: the first active one) to ``folder``.

    Args:
        base_model: the model it belongs on: an alias (``"minilm"``), a local folder or a hub name.
            Default: what :func:`deltatune.train.models.load_model` loaded, else a transformers
            model's ``config.name_or_path``; a relative path to an existing folder is made absolute.
        extra: the caller's metadata, stored as given under ``extra`` and read back as stored
            (:func:`read_config`): a JSON object (text keys; lists, not tuples; finite numbers).

    Returns:
        The folder, holding ``adapter_config.json`` and ``adapter.safetensors`` (no base weights).

    Raises:
        ValueError: a bad ``base_model``, or an ``extra`` that is not JSON, naming the field;
            nothing is written.
    """
    att = wrapper.attachment_of(model)
    name = adapter if adapter is not None else (att.active[0] if att.active else next(iter(att.adapters)))
    info = att.info(name)
    method, overrides = _stored_configs(info)
    recorded: dict[str, Any] = {
        "base_model": _portable(base_model) if base_model is not None else base_model_of(model)
    }
    if extra is not None:
        recorded["extra"] = _json_object(extra, "save")
    check_recorded(recorded, "save")
    config = {
        "format_version": FORMAT_VERSION,
        "library": "deltatune",
        "adapter_name": name,
        "method": type(method).name,
        "config": contract.method_fields(method),
        "targets": list(info.targets),
        "overrides": {k: {f: to_jsonable(v) for f, v in vals.items()} for k, vals in overrides.items()},
        "modules_to_save": list(info.modules_to_save),
        "seed": info.seed,
        # Content hashes of the adapted modules only: a module trained in full is stored whole, so
        # the base's values there (e.g. a freshly initialised task head) do not matter.
        "fingerprint": fingerprint(model, [*info.targets, *info.modules_to_save], content=info.targets),
        **recorded,
    }
    quantized = quantized_base.quantized_record(model)
    if quantized is not None:  # trained on a 4-bit base: what loading it needs (deltatune.runtime.quant)
        config[quantized_base.RECORD_KEY] = quantized
    state = adapter_state(model, name)
    folder = Path(folder)
    write_files(folder, {CONFIG_NAME: json_writer(config), WEIGHTS_NAME: tensors_writer(state)})
    return folder


def _portable(name: str) -> str:
    """A relative path to an existing folder made absolute (it must work from any directory); an
    alias or hub name as it is. A bare word stays a bare word: it is how aliases are spelt."""
    if not isinstance(name, str):
        return name  # check_recorded names the bad value
    looks_like_path = "/" in name or os.sep in name or name.startswith((".", "~"))
    return _absolute_folder(name) if looks_like_path else name


def _absolute_folder(name: str) -> str:
    """``name`` resolved to an absolute path when it is a folder that can be looked at; as given
    when it is not a folder (a hub name such as ``org/model``) or cannot be looked at (another
    user's, an unmounted volume, a name the system refuses): recording where a model came from must
    never make a save fail."""
    path = Path(name).expanduser()
    try:
        return str(path.resolve()) if path.is_dir() else name
    except (OSError, RuntimeError):  # (RuntimeError: a symlink loop, on Python 3.10 and 3.11)
        return name


def base_model_of(model: nn.Module) -> str | None:
    """The base model a model was loaded from, when it says: ``load_model``'s tag, else a
    transformers config's ``name_or_path`` (empty for a model built from a config)."""
    tagged = model.__dict__.get(BASE_MODEL_ATTR)
    if isinstance(tagged, str) and tagged:
        return tagged
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if isinstance(name, str) and name:
        return _absolute_folder(name)
    return None


def _json_object(extra: Any, where: str) -> dict[str, Any]:
    """``extra`` as the JSON object it will be read back as; refused where that would differ."""
    if not isinstance(extra, Mapping):
        raise ValueError(f"{where}: extra must be a mapping (a JSON object), got {extra!r}")
    try:
        stored = json.loads(json.dumps(dict(extra), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: extra must be JSON (text keys, finite numbers): {e}") from e
    if stored != extra:
        raise ValueError(
            f"{where}: extra must read back as given (text keys, lists rather than tuples), got {extra!r}"
        )
    return dict(stored)


def check_recorded(config: Mapping[str, Any], where: str) -> None:
    """Check the ``base_model`` and ``extra`` records (each may be absent; ``base_model`` null).

    Raises:
        ValueError: ``"<where>: <field> must be <constraint>, got <value>"``.
    """
    base = config.get("base_model")
    if base is not None and not (isinstance(base, str) and base.strip()):
        raise ValueError(
            f"{where}: base_model must be a model alias, local path or hub name (a non-empty string), "
            f"got {base!r}"
        )
    if "extra" in config and not isinstance(config["extra"], dict):
        raise ValueError(f"{where}: extra must be a JSON object, got {config['extra']!r}")


def _stored_configs(info: wrapper.AdapterInfo) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The method config and per-module overrides that the file records.

    A method may store itself as another config (``stored_method()``: PiSSA-initialised LoRA saves as
    a plain LoRA of twice the rank); then the overrides are rewritten per module path.
    """
    method = contract.hooks(info.method).stored_method()
    if method == info.method:
        return info.method, info.overrides
    overrides: dict[str, dict[str, Any]] = {}
    for path in info.targets:
        cfg = contract.hooks(info.configs[path]).stored_method()
        diff = {
            f.name: getattr(cfg, f.name)
            for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(method, f.name)
        }
        if diff:
            overrides[re.escape(path)] = diff
    return method, overrides


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` (format version, required keys)."""
    data = read_files(folder, [CONFIG_NAME], "deltatune adapter")[CONFIG_NAME]
    return parse_config(data, Path(folder) / CONFIG_NAME)


def read_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked config and the tensors of the adapter saved in ``folder``, both of one version of
    it, even while another process saves the folder again (:func:`deltatune.formats.files.read_folder`)."""
    data = read_files(folder, [CONFIG_NAME, WEIGHTS_NAME], "deltatune adapter")
    config = parse_config(data[CONFIG_NAME], Path(folder) / CONFIG_NAME)
    weights = Path(folder) / WEIGHTS_NAME
    if data[WEIGHTS_NAME] is None:
        raise ValueError(f"{weights} does not exist")
    return config, tensorfile.tensors(data[WEIGHTS_NAME], weights)


def read_files(folder: str | os.PathLike[str], names: list[str], kind: str) -> dict[str, Any]:
    """The files ``names`` of one version of ``folder`` (None for those other than the first that
    are missing): :func:`deltatune.formats.files.read_folder`, with errors that say what was expected."""
    if not Path(folder).exists():
        raise ValueError(f"{folder}: does not exist (so no {names[0]}); expected a {kind} folder")
    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: not a folder; expected a {kind} folder")
    try:
        found = read_folder(folder, names)
    except OSError as e:
        raise ValueError(f"{folder}: cannot be read ({e.strerror or e})") from e
    if found[names[0]] is None:
        raise ValueError(f"{folder}: no {names[0]} (is this a {kind} folder?)")
    return found


def parse_config(data: bytes, path: Path) -> dict[str, Any]:
    """Check the contents of an ``adapter_config.json`` (read from ``path``)."""
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    folder = path.parent
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "peft_type" in config and "format_version" not in config:
        raise ValueError(f"{folder} is a PEFT adapter; use deltatune.import_peft(model, folder)")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise ValueError(f"{path}: format_version missing or not an integer")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version} is newer than this deltatune reads ({FORMAT_VERSION}); "
            "upgrade deltatune"
        )
    required = {"method": str, "config": dict, "targets": list, "fingerprint": dict}
    for key, typ in required.items():
        if not isinstance(config.get(key), typ):
            raise ValueError(f"{path}: {key!r} missing or not a {typ.__name__}")
    if version <= 2:  # the harness's records, as top-level keys then
        harness = {key: config.pop(key) for key in _HARNESS_KEYS if key in config}
        if "extra" in config:
            raise ValueError(f"{path}: unknown key(s) ['extra'] (format_version {version} has none)")
        if harness:
            config["extra"] = {HARNESS_SECTION: harness}
    check_recorded(config, str(path))
    known = {
        "base_model",
        "extra",
        "format_version",
        "library",
        "adapter_name",
        "method",
        "config",
        "targets",
        "overrides",
        "modules_to_save",
        "seed",
        "fingerprint",
        quantized_base.RECORD_KEY,
    }
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}")
    if quantized_base.RECORD_KEY in config:
        quantized_base.check_record(config[quantized_base.RECORD_KEY], str(path))
    return config


def read_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupted file is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    return tensorfile.tensors(bytearray(path.read_bytes()), path)


def load(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    trainable: bool = False,
    activate: bool = True,
    strict_base: bool = True,
    quantize: bool | None = None,
    module_copies: bool = True,
    read: tuple[Mapping[str, Any], Mapping[str, torch.Tensor]] | None = None,
) -> wrapper.Attachment:
    """Inject the adapter saved in ``folder`` into ``model`` and load its tensors.

    Args:
        name: the adapter's name on this model (default: the name it was saved under).
        trainable: leave the loaded adapter's parameters trainable (default: frozen, for inference).
        strict_base: refuse a base whose adapted weights differ from the ones the adapter was saved
            on (a sampled hash, :func:`deltatune.runtime.fingerprint.content_hash`). False: load it anyway
            (class and shapes must still match).
        quantize: for an adapter trained on a 4-bit base (it records ``quantized_base``): True
            quantises the modules it records, rebuilding the base it was trained on; None quantises
            only a QPiSSA residual (which its factors are relative to) and loads a QLoRA adapter on
            the base as given, float or 4-bit; False quantises nothing (a QPiSSA adapter is refused).
            See :func:`deltatune.runtime.quantized_base.load_plan`.
        module_copies: load the full module copies it saved (``modules_to_save``: a classifier
            head). False leaves them out: the adapter's own update alone, e.g. to combine it with
            adapters of other tasks on a model that has another head.
        read: the folder's ``(config, tensors)`` as :func:`read_adapter` read them, for a caller
            that checks the files before loading them (what it checked is then what loads).

    Raises:
        ValueError: wrong format, unknown method or field, different base model, missing, extra
            or mis-shaped tensors, corrupted file. The model is left as it was.
    """
    config, tensors = read if read is not None else read_adapter(folder)
    where = str(Path(folder))
    method = contract.method_from_config(config["method"], config["config"])
    copies = list(config.get("modules_to_save") or [])
    fingerprint = config["fingerprint"]
    if not module_copies:  # the copies, and the base modules they copy, play no part
        tensors = {k: v for k, v in tensors.items() if not any(k.startswith(f"{p}.module.") for p in copies)}
        if isinstance(fingerprint, Mapping):
            fingerprint = {p: v for p, v in fingerprint.items() if p not in copies}
        copies = []
    check_fingerprint(model, fingerprint, where, strict_base=strict_base)
    plan = quantized_base.load_plan(model, config.get(quantized_base.RECORD_KEY), quantize, where)
    name = name if name is not None else str(config.get("adapter_name", "default"))
    return inject_filled(
        model,
        method,
        tensors,
        where,
        plan=plan,
        trainable=trainable,
        targets=list(config["targets"]),
        name=name,
        overrides={
            k: {f: from_jsonable(v, f"overrides[{k!r}].{f}") for f, v in vals.items()}
            for k, vals in (config.get("overrides") or {}).items()
        },
        modules_to_save=copies,
        seed=int(config.get("seed", 0)),
        activate=activate,
    )


def inject_filled(
    model: nn.Module,
    method: Any,
    tensors: Mapping[str, torch.Tensor],
    where: str,
    *,
    trainable: bool,
    name: str,
    plan: quantized_base.LoadPlan | None = None,
    **inject_args: Any,
) -> wrapper.Attachment:
    """Inject, then fill the adapter with ``tensors``; on any failure the model is put back as it
    was (the previously active adapters, every ``requires_grad`` flag: :func:`wrapper.all_or_nothing`).
    First of all, the sizes the config promises are checked against the tensors
    (:func:`deltatune.runtime.checks.check_sizes`): a config cannot make it allocate what the file lacks."""
    targets = inject_args.get("targets")
    modules = wrapper.base_modules(model, model.__dict__.get(wrapper.ATTACHMENT_ATTR))
    if isinstance(targets, list) and targets and all(isinstance(t, str) and t in modules for t in targets):
        checks.check_sizes(
            method,
            {t: modules[t] for t in targets},
            inject_args.get("overrides") or {},
            tensors,
            where,
            shared_key=contract.SHARED_ATTR,
            skip=inject_args.get("modules_to_save") or (),
        )
    with wrapper.all_or_nothing(model):
        if plan is not None:  # a 4-bit base: plain weights first, a QPiSSA residual once initialised
            plan.quantize_before(model)
        att = core.inject(model, method, name=name, **inject_args)
        if plan is not None:
            plan.quantize_after(model)
        load_adapter_state(model, name, tensors, where)
        if not trainable:
            for p in att.adapters[name].trainable:
                p.requires_grad_(False)
    return att
