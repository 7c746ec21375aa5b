"""What a method declares about its counterpart in PEFT's adapter format: the field table type
(:class:`PeftField`), the placement fields every PEFT layer tuner shares, and a reader for PEFT's
config values. Methods import this (it imports nothing of deltatune); :mod:`deltatune.peft`, the
boundary that reads and writes PEFT's files, uses what the methods declare with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class PeftField:
    """How :func:`import_peft` treats one field of PEFT's ``adapter_config.json``.

    A method that reads PEFT's format may declare ``peft_fields: ClassVar[Mapping[str, PeftField]]``,
    one entry per field of PEFT's config class (a test walks it against the installed PEFT);
    :func:`import_peft` then checks every field of the file against it before anything else, and
    refuses fields the table does not know (a newer PEFT) unless ``unknown_fields="ignore"``.

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
        "supported", "deltatune's modules_to_save (deltatune.peft)", "a list", (list,)
    ),
}
