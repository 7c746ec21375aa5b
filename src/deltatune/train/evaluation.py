"""Evaluation: a task's metrics on a list of examples, and greedy generation for generation tasks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .batches import Collator, autocast, count_of, device_of, logits_of, loss_of_logits, prompt_of, to_device
from .config import TrainConfig
from .data import Example
from .progress import Progress
from .tasks import Task, compute

__all__ = ["evaluate", "generate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    cfg: TrainConfig,
    progress: bool = True,
    samples: list[dict[str, str]] | None = None,
) -> dict[str, float]:
    """The task's metrics (and the mean loss) on ``examples``, in eval mode (the model's mode is restored).

    Classification takes the argmax of the logits, regression the first output, generation the greedy
    continuation of each prompt (:func:`generate`); :func:`deltatune.train.tasks.compute` scores them.
    Generation also reports the perplexity (``exp`` of the mean token loss). On the user's causal data
    (a task with ``fmt``) only the first ``cfg.eval_generate`` examples are generated and scored (the
    loss covers all); their prompts, references and outputs are appended to ``samples`` if given.
    ``cfg`` gives ``max_length``, ``eval_batch_size``, ``max_new_tokens`` and ``precision``.
    """
    was_training = model.training
    model.eval()
    collate = Collator(task, tokenizer, cfg.max_length)
    total = count = 0.0
    predictions: list[Any] = []
    generated = len(examples) if task.fmt is None else min(cfg.eval_generate, len(examples))
    bar = Progress(len(examples), "eval", unit="example", enabled=progress, leave=False)
    for start in range(0, len(examples), cfg.eval_batch_size):
        chunk = examples[start : start + cfg.eval_batch_size]
        batch = to_device(collate(chunk), device_of(model))
        with autocast(cfg.precision):
            logits = logits_of(model, batch)  # one forward serves the loss and the predictions
        total += float(loss_of_logits(logits, batch["labels"], task.kind))
        count += count_of(batch, task.kind)
        if task.kind != "generation":
            logits = logits.float()
            predictions.extend(
                logits.argmax(-1).tolist() if task.kind == "classification" else logits[:, 0].tolist()
            )
        elif start < generated:
            predictions.extend(generate(model, tokenizer, task, chunk[: generated - start], cfg))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    metrics = {"loss": total / max(count, 1)}
    if task.kind == "generation":
        metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
    scored = list(examples[:generated]) if task.kind == "generation" else list(examples)
    if task.metrics and scored:
        metrics.update(compute(task, predictions, scored))
    if samples is not None and task.kind == "generation":
        samples.extend(
            {"prompt": prompt_of(task, e), "reference": e.refs[0] if e.refs else "", "output": out}
            for e, out in zip(scored, predictions, strict=True)
        )
    return metrics


def generate(
    model: nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example], cfg: TrainConfig
) -> list[str]:
    """Greedy continuations of the prompts (left-padded so that generation continues each one)."""
    prompts = [prompt_of(task, e) for e in examples]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = to_device(
            tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False), device_of(model)
        )
    finally:
        tokenizer.padding_side = side
    target: Any = model.module if hasattr(model, "module") else model
    out = target.generate(
        **enc,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts: list[str] = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip().split("\n")[0] if task.name == "e2e" else t.strip() for t in texts]
