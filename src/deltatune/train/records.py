"""What a run leaves behind: the adapter (or trained tensors), ``metrics.json``, ``curves.png`` and
``generations.jsonl``, and the record of the run those files hold."""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formats.files import tensors_writer, write_file
from ..runtime import wrapper
from ..runtime.quantized_base import weight_bytes
from ..runtime.state import parameter_report
from .config import TrainConfig
from .provenance import save
from .tasks import EVAL_SAMPLE_SEED, Task

__all__ = ["peak_memory_bytes", "run_record", "store", "task_record", "write_generations", "write_record"]


def write_generations(samples: dict[str, list[dict[str, str]]], out: Path) -> None:
    """``generations.jsonl`` (and ``generations-before.jsonl``): prompt, reference and output per line."""
    for when, rows in samples.items():
        if rows:
            name = "generations.jsonl" if when == "after" else "generations-before.jsonl"
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            write_file(out / name, _text_writer(text))


def _text_writer(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write


def run_record(
    cfg: TrainConfig,
    task: Task,
    model: nn.Module,
    facts: dict[str, Any],
    history: dict[str, Any],
    stored_bytes: int,
    started: float,
    world_size: int,
) -> dict[str, Any]:
    """The run's ``metrics.json``: its config, final and initial metrics, sizes, times and history."""
    return {
        "config": cfg.to_dict(),
        "task": task.name,
        "main_metric": task.main_metric,
        "metrics": history["eval"][-1][1],
        "before": history.get("before"),
        # On the examples held out of the training data (cfg.validation): choose settings by these.
        "validation": history.get("validation"),
        "trainable_parameters": facts["trainable"],
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "stored_bytes": stored_bytes,
        # The model's weights in memory (a 4-bit base at what it stores) and, quantised, before.
        "weight_bytes": weight_bytes(model),
        **({"quantized": facts["quantized"]} if "quantized" in facts else {}),
        "train_seconds": round(history["train_seconds"], 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "peak_memory_bytes": peak_memory_bytes(),
        "world_size": world_size,
        "history": history,
    }


def peak_memory_bytes() -> int:
    """The GPU's peak allocation where there is one, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def task_record(cfg: TrainConfig, task: Task, tokenizer: Any = None) -> dict[str, Any]:
    """What an adapter records of its run (the ``task`` of its harness record, see
    :data:`deltatune.train.provenance.TASK_FIELDS`): enough for ``deltatune eval ADAPTER`` to
    evaluate it on the same examples, the same way. A run on the user's data records the file, its
    format and the chat template it was rendered with where that was not the tokenizer's own
    (``deltatune chat`` uses it)."""
    added = {"added_tokens": list(cfg.add_tokens)} if cfg.add_tokens else {}
    if task.fmt is not None:
        data: dict[str, Any] = {"data": cfg.data, "format": task.fmt, "max_length": cfg.max_length, **added}
        if cfg.chat_template is not None and tokenizer is not None:
            data["chat_template"] = tokenizer.chat_template
        return data
    record: dict[str, Any] = {
        "name": task.name,
        "max_length": cfg.max_length,
        "eval_limit": cfg.eval_limit,
        "eval_seed": EVAL_SAMPLE_SEED,  # load_split shuffles with it only when there is a limit
    }
    if task.kind == "generation":
        record["max_new_tokens"] = cfg.max_new_tokens
    return {**record, **added}


def store(
    model: nn.Module, cfg: TrainConfig, task: Task, out: Path, base_model: str | None, tokenizer: Any = None
) -> int:
    """Save what the run produced; return its size in bytes (tensor data)."""
    if wrapper.has_adapters(model):
        save(model, out / "adapter", base_model=base_model, task=task_record(cfg, task, tokenizer))
        return parameter_report(model).stored_bytes
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    write_file(out / "trained.safetensors", tensors_writer(tensors))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_record(record: dict[str, Any], out: Path) -> None:
    """``metrics.json``, and ``curves.png`` where matplotlib is installed."""
    write_file(out / "metrics.json", lambda path: path.write_text(json.dumps(record, indent=1)))
    try:
        from .plot import plot_curves
    except ImportError:
        return
    write_file(out / "curves.png", lambda path: plot_curves(record, path))
