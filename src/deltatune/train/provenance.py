"""The harness's record in an adapter: the head it was trained with and the task it was trained on.

The library's :func:`deltatune.formats.io.save` stores caller metadata uninterpreted (``extra``); the
harness keeps its own under ``extra["harness"]`` (:data:`SECTION`), so that ``deltatune eval ADAPTER``,
``deltatune merge ADAPTER --out DIR`` and ``deltatune chat ADAPTER`` need no ``--model``/``--task``:

* ``head``: ``{"kind": "classification", "num_labels": 2}`` (or ``"regression"``, ``"generation"``),
  read off a transformers model's class and config (:func:`head_of`), or given as ``save(head=...)``.
* ``task``: ``{"name": "sst2", "max_length": 64, "eval_limit": null, "eval_seed": null, ...}``: the
  harness task it was trained on and how it was evaluated (see :data:`TASK_FIELDS`).

Each may be ``null`` or absent. Adapters of format 1 and 2 kept both as top-level keys of
``adapter_config.json``; :func:`deltatune.formats.io.read_config` hands them over as this section.

Example:
    >>> import tempfile, torch, deltatune as dt
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> _ = dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    >>> folder = save(net, tempfile.mkdtemp(), task="sst2")
    >>> recorded(dt.formats.io.read_config(folder), "here")
    {'head': None, 'task': {'name': 'sst2'}}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..formats import io

__all__ = ["HEAD_KINDS", "SECTION", "TASK_FIELDS", "check", "head_of", "recorded", "save"]

#: The key of the harness's section in an adapter's ``extra`` metadata.
SECTION = io.HARNESS_SECTION
HEAD_KINDS = ("classification", "regression", "generation")
#: The fields of a recorded ``task``: name -> what it means. Only ``name`` is required.
TASK_FIELDS: dict[str, str] = {
    "name": "the harness task (deltatune.train.tasks.TASKS), e.g. 'sst2'",
    "max_length": "tokens per example the run used (an integer >= 1)",
    "max_new_tokens": "tokens generated per example when evaluating (an integer >= 1)",
    "eval_limit": "the number of evaluation examples the run used (an integer >= 1; null: all)",
    "eval_seed": "the seed of the shuffle that picked eval_limit examples (null: the first ones)",
    "data": "a run on the user's own data (deltatune train --data): the file or folder (then no name)",
    "format": "that data's format: messages, prompt_completion, text, classification or regression",
    "chat_template": "the chat template its conversations were rendered with, where not the tokenizer's own",
    "added_tokens": "special tokens the run added to the tokenizer, in order (the embeddings grown to "
    "match): a loader adds them again before loading the adapter",
}


def save(
    model: nn.Module,
    folder: str | os.PathLike[str],
    adapter: str | None = None,
    *,
    head: Mapping[str, Any] | None = None,
    task: str | Mapping[str, Any] | None = None,
    base_model: str | None = None,
) -> Path:
    """:func:`deltatune.formats.io.save` with the harness's record of the head and the task.

    Args:
        head: ``{"kind": "classification", "num_labels": N}``, ``{"kind": "regression"}`` or
            ``{"kind": "generation"}``. Default: read off a transformers model's class and config.
        task: the harness task it was trained on: a name (``"sst2"``) or a mapping with the keys
            of :data:`TASK_FIELDS` (``{"name": "sst2", "max_length": 64}``).

    Raises:
        ValueError: a bad ``base_model``, ``head`` or ``task``, naming the field; nothing is written.
    """
    section = {
        "head": (dict(head) if isinstance(head, Mapping) else head) if head is not None else head_of(model),
        "task": {"name": task}
        if isinstance(task, str)
        else (dict(task) if isinstance(task, Mapping) else task),
    }
    check(section, "save")
    return io.save(model, folder, adapter, base_model=base_model, extra={SECTION: section})


def recorded(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The checked ``head`` and ``task`` an adapter's config (:func:`deltatune.formats.io.read_config`)
    records, each None where it records none.

    Raises:
        ValueError: ``"<where>: <field> must be <constraint>, got <value>"``.
    """
    section = (config.get("extra") or {}).get(SECTION)
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}: extra.{SECTION} must be a mapping with head and task, got {section!r}")
    unknown = sorted(set(section) - {"head", "task"})
    if unknown:
        raise ValueError(f"{where}: unknown extra.{SECTION} field(s) {unknown}; known: ['head', 'task']")
    check(section, where)
    return {"head": section.get("head"), "task": section.get("task")}


def head_of(model: nn.Module) -> dict[str, Any] | None:
    """The head of a transformers model, as :func:`deltatune.train.models.load_model` builds it:
    sequence classification (regression with one output and no other problem type), or a language
    model head. None for anything else."""
    config = getattr(model, "config", None)
    if config is not None and type(model).__name__.endswith("ForSequenceClassification"):
        labels = int(getattr(config, "num_labels", 2))
        problem = getattr(config, "problem_type", None)
        if problem == "regression" or (problem is None and labels == 1):
            return {"kind": "regression"}
        return {"kind": "classification", "num_labels": labels}
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate() is True:
        return {"kind": "generation"}
    return None


def _is_int(value: Any, low: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def check(section: Mapping[str, Any], where: str) -> None:
    """Check the ``head`` and ``task`` records (each may be absent or null).

    Raises:
        ValueError: ``"<where>: <field> must be <constraint>, got <value>"``.
    """
    head = section.get("head")
    if head is not None:
        _check_head(head, where)
    task = section.get("task")
    if task is not None:
        _check_task(task, where)


def _check_head(head: Any, where: str) -> None:
    if not isinstance(head, Mapping):
        raise ValueError(
            f"{where}: head must be a mapping such as {{'kind': 'classification', ...}}, got {head!r}"
        )
    extra = sorted(set(head) - {"kind", "num_labels"})
    if extra:
        raise ValueError(f"{where}: unknown head field(s) {extra}; known: ['kind', 'num_labels']")
    kind, labels = head.get("kind"), head.get("num_labels")
    if kind not in HEAD_KINDS:
        raise ValueError(f"{where}: head.kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
    if kind == "classification" and not _is_int(labels, 1):
        raise ValueError(
            f"{where}: head.num_labels must be an integer >= 1 for a classification head, got {labels!r}"
        )
    if kind == "regression" and labels not in (None, 1):
        raise ValueError(
            f"{where}: head.num_labels must be 1 or absent for a regression head, got {labels!r}"
        )
    if kind == "generation" and labels is not None:
        raise ValueError(f"{where}: head.num_labels must be absent for a generation head, got {labels!r}")


def _check_task(task: Any, where: str) -> None:
    if not isinstance(task, Mapping):
        raise ValueError(
            f"{where}: task must be a task name or a mapping such as {{'name': 'sst2'}}, got {task!r}"
        )
    extra = sorted(set(task) - set(TASK_FIELDS))
    if extra:
        raise ValueError(f"{where}: unknown task field(s) {extra}; known: {list(TASK_FIELDS)}")
    name = task.get("name")
    for key in ("data", "format", "chat_template"):
        if task.get(key) is not None and not isinstance(task[key], str):
            raise ValueError(f"{where}: task.{key} must be text or null, got {task[key]!r}")
    if not (isinstance(name, str) and name.strip()) and task.get("data") is None:
        raise ValueError(f"{where}: task.name must be a task name such as 'sst2', got {name!r}")
    added = task.get("added_tokens")
    if added is not None and not (
        isinstance(added, list) and added and all(isinstance(t, str) and t for t in added)
    ):
        raise ValueError(
            f"{where}: task.added_tokens must be a non-empty list of tokens or null, got {added!r}"
        )
    for key, low in (("max_length", 1), ("max_new_tokens", 1), ("eval_limit", 1), ("eval_seed", None)):
        value = task.get(key)
        if value is not None and not _is_int(value, low):
            bound = f"an integer >= {low}" if low is not None else "an integer"
            raise ValueError(f"{where}: task.{key} must be {bound} or null, got {value!r}")
