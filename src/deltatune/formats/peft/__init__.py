"""PEFT's adapter format: one translator per ``peft_type``, every one of them listed here.

A :class:`Translator` turns PEFT's ``adapter_config.json`` and tensors into a deltatune method, its
targets and its tensors (:attr:`Translator.from_peft`), and an adapter of one of the methods it
names back (:attr:`Translator.to_peft`). :mod:`deltatune.formats.peft.convert` (``import_peft``,
``export_peft``) handles what every PEFT adapter shares (the files, ``modules_to_save``, ``task_type``,
``base_model_name_or_path``, ``inference_mode``) and dispatches through :data:`TRANSLATORS`. The
methods know nothing of PEFT: the translators import them, never the other way round.

Example:
    >>> sorted(TRANSLATORS)
    ['ADALORA', 'LORA', 'PREFIX_TUNING', 'PROMPT_TUNING', 'P_TUNING', 'TRAINABLE_TOKENS', 'VBLORA', 'VERA']
    >>> import deltatune as dt
    >>> peft_type_of(dt.DoRA()), peft_type_of(dt.BitFit())
    ('LORA', None)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...contract import Method
from ...runtime.wrapper import Attachment
from . import adalora, lora, prompts, tokens, vblora, vera
from .fields import PeftField

#: ``from_peft(config, tensors, model) -> (method, targets, overrides, state)``: ``config`` is
#: PEFT's ``adapter_config.json``; ``tensors`` the file's tensors under PEFT's names, the
#: ``modules_to_save`` copies already taken out. Returns the method config, the module paths it
#: adapts, per-module field overrides, and the adapter's tensors named as
#: :func:`deltatune.runtime.state.adapter_state` names them (``"<path>.<key>"``,
#: ``"deltatune_shared.<key>"``).
#: A PEFT option it cannot represent is a ``ValueError`` naming it (prefixed with the file).
FromPeft = Callable[
    [Mapping[str, Any], Mapping[str, torch.Tensor], nn.Module],
    tuple[Method, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]],
]
#: ``to_peft(method, attachment, name) -> (config, tensors)``: the type's part of PEFT's config and
#: its tensors under PEFT's names (without ``modules_to_save`` copies, ``peft_type``,
#: ``base_model_name_or_path``, ``modules_to_save`` and ``inference_mode``:
#: deltatune.formats.peft.convert adds them). A prompt-learning type sets ``task_type``, read off
#: the model, or None when it cannot tell, which makes the caller's ``task_type`` required; the
#: caller's wins. Anything PEFT cannot load, or would compute differently, is a ``ValueError``.
ToPeft = Callable[[Method, Attachment, str], tuple[dict[str, Any], dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Translator:
    """How one of PEFT's ``peft_type`` maps to deltatune's methods.

    Attributes:
        peft_type: PEFT's ``peft_type`` (``"LORA"``, ``"PROMPT_TUNING"``, ...).
        methods: the registered names of the deltatune methods it writes (and reads).
        prefix: how PEFT's tensor names of this type spell the base model's modules:
            ``"base_model.model."`` for PEFT's tuners, ``"base_model."`` for its prompt learning
            (also used for the ``modules_to_save`` copies).
        fields: every field of PEFT's config class, checked by ``import_peft`` before
            ``from_peft`` runs (a test walks each against the installed PEFT); None: the config is
            not checked field by field (prompt learning: the translator reads what it needs).
        from_peft, to_peft: see :data:`FromPeft` and :data:`ToPeft`.
    """

    peft_type: str
    methods: tuple[str, ...]
    prefix: str
    fields: Mapping[str, PeftField] | None
    from_peft: FromPeft
    to_peft: ToPeft


#: PEFT's ``peft_type`` -> its translator: every PEFT type deltatune reads and writes.
TRANSLATORS: dict[str, Translator] = {
    t.peft_type: t
    for t in (
        Translator("LORA", ("lora", "dora"), lora.PREFIX, lora.FIELDS, lora.from_peft, lora.to_peft),
        Translator("VERA", ("vera",), vera.PREFIX, vera.FIELDS, vera.from_peft, vera.to_peft),
        Translator("VBLORA", ("vblora",), vblora.PREFIX, vblora.FIELDS, vblora.from_peft, vblora.to_peft),
        Translator(
            "ADALORA", ("adalora",), adalora.PREFIX, adalora.FIELDS, adalora.from_peft, adalora.to_peft
        ),
        Translator(
            "TRAINABLE_TOKENS",
            ("trainable_tokens",),
            tokens.PREFIX,
            tokens.FIELDS,
            tokens.from_peft,
            tokens.to_peft,
        ),
        Translator(
            "PROMPT_TUNING",
            ("prompt_tuning",),
            prompts.PREFIX,
            None,
            prompts.prompt_tuning_from_peft,
            prompts.prompt_tuning_to_peft,
        ),
        Translator(
            "PREFIX_TUNING",
            ("prefix_tuning",),
            prompts.PREFIX,
            None,
            prompts.prefix_tuning_from_peft,
            prompts.prefix_tuning_to_peft,
        ),
        Translator(
            "P_TUNING",
            ("p_tuning",),
            prompts.PREFIX,
            None,
            prompts.p_tuning_from_peft,
            prompts.p_tuning_to_peft,
        ),
    )
}

#: A method's registered name -> the translator that writes it (for ``export_peft``).
BY_METHOD: dict[str, Translator] = {name: t for t in TRANSLATORS.values() for name in t.methods}


def translator_of(method: Method) -> Translator | None:
    """The translator that writes ``method``'s adapters in PEFT's format; None: PEFT has no such type."""
    return BY_METHOD.get(type(method).name)


def peft_type_of(method: Method) -> str | None:
    """PEFT's ``peft_type`` for ``method``'s adapters; None: PEFT has no counterpart."""
    found = translator_of(method)
    return None if found is None else found.peft_type
