"""Learning tasks one after another without forgetting: the verbs of a task sequence.

A continual adapter (a method with ``task_sequence = True``: :class:`~deltatune.OLoRA`,
:class:`~deltatune.AMLoRA`) holds one LoRA per task in one adapter; only the newest task trains,
the earlier ones stay frozen and active, so the model serves every task learnt so far without being
told which one an input belongs to. The sequence is one adapter, so :func:`deltatune.save` writes it
as one folder (every task's LoRA, AM-LoRA's mixer, the task names in ``adapter_config.json``) and
:func:`load` puts it back.

    att = dt.continual.start(model, dt.OLoRA(rank=8), "sst2", targets=["query", "value"])
    ... train on SST-2 (dt.regularization(model) adds O-LoRA's orthogonality term) ...
    dt.continual.add_task(model, "agnews")          # SST-2's LoRA is frozen, AG News' trains
    ... build a new optimizer, train on AG News ...
    dt.save(model, "runs/sequence")
    dt.continual.load(fresh_model, "runs/sequence") # both tasks, ready to serve

A LoRA trained on its own (``deltatune train``, :func:`deltatune.save`) can join a sequence as its
next task: ``add_task(model, "mrpc", from_folder="runs/mrpc_lora")`` (same base, targets and rank).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = dt.continual.start(net, dt.OLoRA(rank=2), "first", targets=["0", "2"])
    >>> _ = dt.continual.add_task(net, "second")
    >>> dt.continual.task_names(net)
    ('first', 'second')
    >>> sorted({p.shape for p in dt.trainable_parameters(net)})  # only the second task's factors
    [torch.Size([2, 2]), torch.Size([2, 8]), torch.Size([8, 2])]
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import contract
from .formats.io import WEIGHTS_NAME, read_adapter
from .formats.io import load as load_adapter
from .methods.lowrank.task_loras import TaskLoRAs
from .runtime import checks, core, wrapper
from .runtime.compose import reconfigure
from .runtime.fingerprint import check_fingerprint

__all__ = ["DEFAULT_NAME", "add_task", "load", "start", "task_names"]

#: The adapter name a sequence gets unless told otherwise.
DEFAULT_NAME = "continual"


def _sequence_method(method: Any, where: str) -> Any:
    spec = contract.hooks(method)
    if not spec.task_sequence:
        sequences = sorted(n for n, cls in contract.REGISTRY.items() if cls.task_sequence)
        raise ValueError(
            f"{where}: {type(method).__name__} does not learn a sequence of tasks; use a method that "
            f"does ({', '.join(sequences)}), e.g. deltatune.OLoRA(rank=8)"
        )
    return method


def start(
    model: nn.Module,
    method: Any,
    task: str,
    *,
    targets: Any = None,
    name: str = DEFAULT_NAME,
    seed: int = 0,
    overrides: Any = None,
) -> wrapper.Attachment:
    """Begin a task sequence on ``model``: inject ``method`` (its ``tasks`` replaced by ``(task,)``)
    as adapter ``name``, active and training the first task."""
    _sequence_method(method, "continual.start")
    first = dataclasses.replace(method, tasks=(task,))
    return core.inject(model, first, targets, name=name, seed=seed, overrides=overrides)


def task_names(model: nn.Module, name: str = DEFAULT_NAME) -> tuple[str, ...]:
    """The tasks of sequence ``name``, oldest first (the last one is the one that trains)."""
    method = wrapper.attachment_of(model).info(name).method
    _sequence_method(method, f"continual.task_names: adapter {name!r}")
    tasks: tuple[str, ...] = method.tasks  # type: ignore[attr-defined]
    return tasks


def add_task(
    model: nn.Module,
    task: str,
    *,
    name: str = DEFAULT_NAME,
    method: Any = None,
    from_folder: str | os.PathLike[str] | None = None,
    strict_base: bool = True,
) -> wrapper.Attachment:
    """Add the next task to sequence ``name``: the tasks so far are frozen (and stay active), a new
    LoRA for ``task`` trains, with AM-LoRA's mixer. Build a new optimizer afterwards.

    Args:
        method: the sequence's method with other field values for the rest of the run (e.g. another
            ``orthogonality``); its class must be the sequence's (a sequence does not mix methods),
            and its ``tasks`` are ignored.
        from_folder: a saved plain LoRA adapter (:func:`deltatune.save`) to start the new task from:
            trained on the same base model (checked as :func:`deltatune.load` does, unless
            ``strict_base=False``), on the sequence's targets, with its rank.

    Raises:
        ValueError: not a sequence, a task name in use or not a name, another method, a folder whose
            adapter does not fit. The model is left as it was.
    """
    att = wrapper.attachment_of(model)
    current = att.info(name).method
    _sequence_method(current, f"continual.add_task: adapter {name!r}")
    tasks: tuple[str, ...] = current.tasks  # type: ignore[attr-defined]
    if method is not None and type(method) is not type(current):
        raise ValueError(
            f"continual.add_task: sequence {name!r} is {type(current).__name__}; task {task!r} cannot use "
            f"{type(method).__name__} (one sequence, one method: start another sequence under another name)"
        )
    if task in tasks:
        raise ValueError(
            f"continual.add_task: sequence {name!r} already has a task {task!r} (tasks: {list(tasks)})"
        )
    grown: Any = dataclasses.replace(
        cast(Any, method if method is not None else current), tasks=(*tasks, task)
    )
    factors = _task_from_folder(model, att, name, grown, from_folder, strict_base) if from_folder else None
    reconfigure(model, name, grown)
    if factors is not None:
        with torch.no_grad():
            for path, (A, B) in factors.items():
                loras = _loras(att, name, path)
                loras.lora_A[task].copy_(A)
                loras.lora_B[task].copy_(B)
    return att


def _loras(att: wrapper.Attachment, name: str, path: str) -> TaskLoRAs:
    """The per-task factors of sequence ``name`` at ``path``."""
    loras = att.wrappers[path].adapters[name].loras
    assert isinstance(loras, TaskLoRAs)  # (every task_sequence method keeps them as ``loras``)
    return loras


def _task_from_folder(
    model: nn.Module,
    att: wrapper.Attachment,
    name: str,
    grown: Any,
    folder: str | os.PathLike[str],
    strict_base: bool,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """path -> (A, B) of the plain LoRA saved in ``folder``, B rescaled to the sequence's scale."""
    where = str(Path(folder))
    config, tensors = read_adapter(folder)
    if config["method"] != "lora":
        raise ValueError(
            f"continual.add_task: {where} holds a {config['method']!r} adapter; a sequence of "
            f"{type(grown).__name__} takes a plain LoRA as a new task (one sequence, one method)"
        )
    lora: Any = contract.method_from_config("lora", config["config"])
    targets = list(att.info(name).targets)
    if (
        sorted(config["targets"]) != sorted(targets)
        or config.get("overrides")
        or config.get("modules_to_save")
    ):
        raise ValueError(
            f"continual.add_task: {where} adapts {checks.few(sorted(config['targets']))}; the sequence "
            f"{name!r} adapts {checks.few(sorted(targets))} (and a task has no overrides or module copies)"
        )
    if hasattr(lora.init, "from_weight"):
        raise ValueError(
            f"continual.add_task: {where} is a {type(lora.init).__name__}-initialised LoRA saved in "
            "'native' mode (its frozen part is recomputed from the weight); save it with "
            "save_mode='lora' to add it as a task"
        )
    if lora.rank != grown.rank:
        raise ValueError(
            f"continual.add_task: {where} is a LoRA of rank {lora.rank}; the sequence's tasks have rank "
            f"{grown.rank}"
        )
    check_fingerprint(model, config["fingerprint"], where, strict_base=strict_base)
    newest = {p: _loras(att, name, p) for p in targets}
    expected = {
        f"{p}.lora_{m}": tuple(getattr(loras, f"lora_{m}")[loras.newest].shape)
        for p, loras in newest.items()
        for m in "AB"
    }
    shapes = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    checks.check_state(shapes, tensors, where)
    ratio = lora.scale / grown.scale  # type: ignore[attr-defined]
    return {p: (tensors[f"{p}.lora_A"], tensors[f"{p}.lora_B"] * ratio) for p in targets}


def load(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    trainable: bool = False,
    strict_base: bool = True,
) -> wrapper.Attachment:
    """Load a saved task sequence (:func:`deltatune.save` of a continual adapter) onto ``model``.

    Every task listed in the folder's ``adapter_config.json`` must have its tensors in the file;
    a task missing is named. ``trainable=True`` trains the newest task further (the others stay
    frozen); :func:`add_task` continues the sequence.
    """
    where = str(Path(folder))
    config, tensors = read_adapter(folder)  # (one version: what is checked here is what loads)
    method = contract.method_from_config(config["method"], config["config"])
    _sequence_method(method, f"continual.load: {where}")
    listed: tuple[str, ...] = method.tasks  # type: ignore[attr-defined]
    held = {k.split(".lora_A.", 1)[1] for k in tensors if ".lora_A." in k}
    missing = [t for t in listed if t not in held]
    if missing:
        raise ValueError(
            f"{where}: adapter_config.json lists the tasks {list(listed)}, but {WEIGHTS_NAME} holds no "
            f"LoRA for {missing} (it holds {sorted(held)}): the sequence is incomplete; save it again "
            "from the model that learnt every task"
        )
    return load_adapter(
        model, folder, name=name, trainable=trainable, strict_base=strict_base, read=(config, tensors)
    )
