"""What the PEFT translators share: the field table type (:class:`PeftField`), the fields every
PEFT config has (:data:`PEFT_BASE_FIELDS`) and those every PEFT layer tuner has
(:data:`PEFT_TUNER_FIELDS`), the check of a config against a table, and the renaming of PEFT's
per-module tensors to deltatune's ``"<path>.<key>"`` and back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from ...runtime.checks import few
from ...runtime.state import adapter_state
from ...runtime.wrapper import Attachment
from ...targets import module_kind

M = TypeVar("M")


@dataclass(frozen=True)
class PeftField:
    """How :func:`deltatune.import_peft` treats one field of PEFT's ``adapter_config.json``.

    A translator may declare a table of them, one entry per field of PEFT's config class (a test
    walks it against the installed PEFT); :func:`deltatune.import_peft` then checks every field of
    the file against it before anything else, and refuses fields the table does not know (a newer
    PEFT) unless ``unknown_fields="ignore"``.

    Attributes:
        handling: "supported" (read as it is, or without effect on the imported adapter),
            "converted" (translated into deltatune's form), or "refused" (only the values in
            ``accepts`` import; any other raises, naming the field and ``why``).
        why: what the field means here, or why other values are refused.
        expected: what a valid value is, in words (used in the error messages).
        types: the JSON types a value may have (``bool`` is never taken for ``int``); None (JSON
            null) always passes unless ``required``.
        accepts: the only values that import (None: any value of ``types``).
        required: the field must be present and not null.
    """

    handling: Literal["supported", "converted", "refused"]
    why: str
    expected: str = "any value"
    types: tuple[type, ...] = (object,)
    accepts: tuple[Any, ...] | None = None
    required: bool = False


def peft_get(config: Mapping[str, Any], key: str, default: Any) -> Any:
    """A field of PEFT's config; its default when absent or null."""
    value = config.get(key)
    return default if value is None else value


# PeftConfig's own fields (every PEFT config has them): handled by deltatune.formats.peft.convert,
# for every type.
PEFT_BASE_FIELDS: dict[str, PeftField] = {
    "peft_type": PeftField(
        "supported", "chooses the translator (deltatune.formats.peft)", "a string", (str,), required=True
    ),
    "task_type": PeftField("supported", "PEFT's task; no effect on the tensors", "a string", (str,)),
    "auto_mapping": PeftField("supported", "PEFT's base-class bookkeeping; no effect", "an object", (dict,)),
    "peft_version": PeftField("supported", "the PEFT version that saved it; no effect", "a string", (str,)),
    "base_model_name_or_path": PeftField("supported", "informative only", "a string", (str,)),
    "revision": PeftField("supported", "the base model's revision; informative only", "a string", (str,)),
    "inference_mode": PeftField("supported", "see import_peft's trainable=", "true or false", (bool,)),
}

#: The fields of PEFT's layer tuners (LoRA, VB-LoRA, ...) that say where an adapter goes: converted
#: (the targets are read off the file's tensors) or supported as they are.
PEFT_TUNER_FIELDS: dict[str, PeftField] = {
    "target_modules": PeftField(
        "converted",
        "the targets are the modules with tensors in the file",
        "a list or string",
        (list, str),
    ),
    "exclude_modules": PeftField("converted", "as target_modules", "a list or string", (list, str)),
    "layers_to_transform": PeftField("converted", "as target_modules", "a list or integer", (list, int)),
    "layers_pattern": PeftField("converted", "as target_modules", "a list or string", (list, str)),
    "fan_in_fan_out": PeftField(
        "supported", "the layout follows the module (GPT-2's Conv1D)", "true or false", (bool,)
    ),
    "modules_to_save": PeftField(
        "supported", "deltatune's modules_to_save (deltatune.formats.peft.convert)", "a list", (list,)
    ),
}


def check_peft_config(
    config: Mapping[str, Any],
    table: Mapping[str, PeftField],
    where: str,
    *,
    unknown_fields: Literal["refuse", "ignore"] = "refuse",
) -> None:
    """Check every field of PEFT's ``config`` against a translator's table (and :data:`PEFT_BASE_FIELDS`).

    Raises:
        ValueError: a required field missing, a value of the wrong type or refused (naming the
            field and what would import), or fields the table does not know (unless ignored).
    """
    fields = {**PEFT_BASE_FIELDS, **table}
    unknown = sorted(set(config) - set(fields))
    if unknown and unknown_fields != "ignore":
        raise ValueError(
            f"{where}: field(s) {few(unknown)} unknown to deltatune's import (saved by a newer "
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


def expect(method: object, cls: type[M]) -> M:
    """``method`` as the method class a translator writes (the registry hands each its own)."""
    if not isinstance(method, cls):
        raise TypeError(f"the PEFT translator of {cls.__name__} was given {type(method).__name__}")
    return method


def module_tensors(
    tensors: Mapping[str, torch.Tensor], prefix: str, names: Mapping[str, str], what: str
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's per-module tensors ``<prefix><path><suffix>`` as {path: {deltatune's key: tensor}},
    ``names`` mapping PEFT's suffixes (tried in order: longest first) to deltatune's keys.

    Raises:
        ValueError: a tensor of no such name (``what``: the method, in the message), or none at all.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in names if key.endswith(s)), None)
        if suffix is None or not key.startswith(prefix):
            raise ValueError(f"unexpected tensor {key!r}: neither {what}'s nor in modules_to_save")
        out.setdefault(key[len(prefix) : -len(suffix)], {})[names[suffix]] = value
    if not out:
        raise ValueError(f"holds no {what} tensors")
    return out


def flat_state(factors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{path: {key: tensor}} as :func:`deltatune.runtime.state.adapter_state` names it: ``"<path>.<key>"``."""
    return {f"{path}.{key}": value for path, found in factors.items() for key, value in found.items()}


def tuner_to_peft(
    method: object,
    attachment: Attachment,
    name: str,
    prefix: str,
    names: Mapping[str, str],
    what: str,
    shared: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(``target_modules`` and ``fan_in_fan_out``, the tensors under PEFT's names) of an adapter of
    a layer tuner that PEFT gives no per-module overrides (VeRA, VB-LoRA): the inverse of
    :func:`module_tensors` on the adapter's state, plus its shared tensors named in ``shared``
    (deltatune's key -> PEFT's).

    Raises:
        ValueError: a module's config differs from ``method`` (``what``: the method, in the message).
    """
    info = attachment.info(name)
    if any(cfg != method for cfg in info.configs.values()):
        raise ValueError(f"PEFT's {what} has no per-module overrides; this adapter has some")
    theirs = {ours: suffix for suffix, ours in names.items()}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in adapter_state(attachment.model, name).items():
        path, _, leaf = key.rpartition(".")
        if shared and key in shared:
            tensors[shared[key]] = value
        elif path in info.targets:
            tensors[f"{prefix}{path}{theirs[leaf]}"] = value
    placement = {
        "target_modules": sorted(info.targets),
        "fan_in_fan_out": any(module_kind(attachment.wrappers[p].base) == "conv1d" for p in info.targets),
    }
    return placement, tensors
