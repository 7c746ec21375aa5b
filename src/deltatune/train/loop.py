"""The training loop: any registered method (or full fine-tuning) on any task, one code path.

* :func:`~deltatune.train.prepare.prepare` applies the method and returns AdamW parameter groups.
* :func:`step` is one optimizer step: forward and backward over the micro-batches of gradient
  accumulation, the loss divided by the *global* count of examples (or target tokens), clipping, the
  optimizer and scheduler steps. Drive it yourself for a loop of your own.
* :func:`train` runs a :class:`~deltatune.train.config.TrainConfig`: data in a fixed order
  (:func:`~deltatune.train.batches.batch_positions`), warmup then linear or cosine decay, fp32 or
  bf16 autocast, evaluation (:mod:`deltatune.train.evaluation`), checkpoints and resume
  (:mod:`deltatune.train.checkpoint`), DDP under ``torchrun``; it writes the adapter,
  ``metrics.json`` and ``curves.png``.

``TrainConfig``, ``Collator``, ``prompt_of``, ``batch_positions`` and ``evaluate`` are importable
from here too.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import regional
from ..lowrank import adapter_precision_as
from ..stepping import lr_factor, needs_step_hooks, on_step, regularization
from .batches import (
    Collator,
    autocast,
    batch_positions,
    count_of,
    device_of,
    grouped_positions,
    loss_sum,
    prompt_of,
    to_device,
)
from .checkpoint import (
    check_out_folder,
    has_checkpoint,
    load_checkpoint,
    remove_run,
    save_checkpoint,
)
from .config import TrainConfig
from .data import Example
from .divergence import DivergedError, after_divergence, check_step, check_weights, grads_bad
from .evaluation import evaluate
from .models import load_model
from .prepare import prepare
from .progress import Progress
from .records import run_record, store, write_generations, write_record
from .reporting import open_reporters
from .sharding import on_first, replicated, shard
from .streaming import StreamedExamples
from .tasks import get_task, load_split
from .userdata import expected_targets, lengths_of, open_for, user_examples

__all__ = [
    "Collator",
    "TrainConfig",
    "World",
    "batch_positions",
    "evaluate",
    "init_world",
    "lr_lambda",
    "prompt_of",
    "step",
    "train",
]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warmup, then ``cfg.schedule``."""
    warmup = int(cfg.warmup_ratio * cfg.steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return f


# -- distributed -------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` (1 without ``torchrun``)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def _all_reduce_sum(value: float, world: World) -> float:
    if world.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


# -- one step ----------------------------------------------------------------------------------


def step(
    model: nn.Module,
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    kind: str,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    max_grad_norm: float = 0.0,
    precision: str = "fp32",
    world: World = World(),
    number: int | None = None,
    denominator: float | None = None,
) -> float:
    """One optimizer step over ``micro_batches`` (gradient accumulation); returns the step's loss.

    Each micro-batch is forwarded and backpropagated in turn; the summed losses are divided by the
    count of examples (``kind`` classification or regression) or target tokens (generation) in all of
    them, on every process, so the gradient is that of one batch of them all. Then the gradient norm
    of the optimizer's parameters is clipped to ``max_grad_norm`` (0: no clipping), the optimizer and
    ``scheduler`` step, and the gradients are set to None.

    Args:
        model: the model, or its ``DistributedDataParallel`` wrapper (which then syncs gradients once,
            on the last micro-batch).
        micro_batches: collated batches (:class:`~deltatune.train.batches.Collator`), with ``labels``.
        kind: ``"classification"``, ``"regression"`` or ``"generation"``.
        optimizer: an optimizer over the trainable parameters; ``scheduler`` steps after it.
        precision: ``"fp32"``, or ``"bf16"`` autocast.
        world: this process's rank and the number of processes (:func:`init_world`).
        number: which optimizer step this is (from 1). Needed when an adapter acts between steps
            (:mod:`deltatune.stepping`): its regularizer joins the loss of the last micro-batch and
            its ``on_step`` runs after ``optimizer.step()``, before the gradients are cleared.
        denominator: divide the step's summed loss by this instead of the count of its examples or
            target tokens. A fixed expected count (``deltatune train --data``: the global batch times
            the mean target tokens per example) weighs every token the same whatever the makeup of
            the batch, so that batches grouped by length optimise what mixed batches do.

    Returns:
        The loss of the step: summed over all micro-batches of all processes, divided by their count.

    Raises:
        ValueError: a micro-batch does not fit in memory (the message says what to change).
        DivergedError: the loss or a gradient is not finite on some process (every process raises it;
            the update is not applied).

    Example:
        >>> import types, torch
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.linear = nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         return types.SimpleNamespace(logits=self.linear(x))
        >>> net = Net()
        >>> opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        >>> x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        >>> halves = [{"x": x[:4], "labels": torch.zeros(4, dtype=torch.long)},
        ...           {"x": x[4:], "labels": torch.ones(4, dtype=torch.long)}]
        >>> first = step(net, halves, "classification", opt, max_grad_norm=1.0)
        >>> losses = [step(net, halves, "classification", opt) for _ in range(30)]
        >>> losses[-1] < first
        True
    """
    device = device_of(model)
    inner = getattr(model, "module", model)  # DistributedDataParallel's wrapped model
    hooked = needs_step_hooks(inner)
    if hooked and number is None:
        raise ValueError(
            "step(): this model's adapter acts between optimizer steps (deltatune.stepping); "
            "pass number= (the optimizer step, counted from 1)"
        )
    batches = [to_device(dict(b), device) for b in micro_batches]
    if denominator is None:
        denominator = _all_reduce_sum(float(sum(count_of(b, kind) for b in batches)), world)
    loss_value = 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        set_sync = getattr(model, "set_requires_gradient_sync", None)  # FSDP2
        if set_sync is not None and world.size > 1:
            set_sync(last)  # reduce-scatter the gradients once, after the last micro-batch
        sync = (
            model.no_sync() if (world.size > 1 and not last and set_sync is None) else nullcontext()  # type: ignore[operator]
        )
        try:
            with sync, autocast(precision):
                loss = loss_sum(model, batch, kind) * (world.size / denominator)
                task_loss = loss.detach()
                if hooked and last:  # once per step, after the last forward (stepping.regularization)
                    loss = loss + regularization(inner).to(loss.device)
                loss.backward()
        except RuntimeError as e:
            if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
                size = len(batch["labels"])
                raise ValueError(
                    f"a batch of {size} examples does not fit in memory on {device}; lower --batch-size "
                    f"and raise --grad-accum to keep the global batch ({size * len(batches) * world.size})"
                ) from e
            raise
        loss_value += float(task_loss) / world.size
    loss_value = _all_reduce_sum(loss_value, world)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bad = _all_reduce_sum(grads_bad(params), world)
    if bad or not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        check_step(number or 0, loss_value, float(optimizer.param_groups[0]["lr"]), bad)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if hooked:
        assert number is not None
        on_step(inner, number, optimizer)
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value


# -- the run -----------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    callbacks: Sequence[Callable[[int, float], None]] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``cfg``; write the adapter, ``metrics.json`` and ``curves.png`` under ``cfg.out``.

    If ``cfg.out`` holds a run of the same config (the options in
    :data:`~deltatune.train.config.RUN_NEUTRAL` aside), it is resumed from its checkpoint
    (``cfg.resume``); a run of another config is refused, unless ``overwrite``, which deletes the
    run's files there and starts over.

    ``model`` and ``tokenizer``: train these instead of loading ``cfg.model``. ``callbacks`` are
    called with ``(step, loss)`` after every step. ``progress``: a bar on a terminal, a plain line
    every few seconds otherwise (see :mod:`deltatune.train.progress`).

    Returns:
        The metrics record that is also written to ``metrics.json`` (empty on processes other than
        the first under ``torchrun``).
    """
    with adapter_precision_as(cfg.adapter_precision):
        return _train(cfg, progress, model, tokenizer, callbacks, overwrite)


def _train(
    cfg: TrainConfig,
    progress: bool,
    model: nn.Module | None,
    tokenizer: Any,
    callbacks: Sequence[Callable[[int, float], None]],
    overwrite: bool,
) -> dict[str, Any]:
    world = init_world()
    source = open_for(cfg) if cfg.data else None
    task = source.task if source is not None else get_task(cfg.task)
    out = Path(cfg.out)
    if not overwrite:
        check_out_folder(cfg)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train_examples: Sequence[Example] | StreamedExamples
    if source is None:
        train_examples = load_split(
            task, "train", cfg.data_dir, limit=cfg.train_limit, seed=cfg.seed if cfg.train_limit else None
        )
        eval_examples = load_split(
            task, "eval", cfg.data_dir, limit=cfg.eval_limit, seed=cfg.seed if cfg.eval_limit else None
        )
    if cfg.batch_size % world.size:
        raise ValueError(
            f"TrainConfig.batch_size {cfg.batch_size} must be divisible by the {world.size} processes"
        )
    # The adapter records cfg.model as its base only when the harness loaded it; a model passed in
    # is recorded by what it says of itself (deltatune.io.base_model_of).
    base_model = cfg.model if model is None else None
    if model is None:
        model, tokenizer = load_model(cfg.model, task.kind, task.num_labels or None, seed=cfg.seed)
    if tokenizer is None:
        raise ValueError("train(model=...) needs the model's tokenizer too (tokenizer=...)")
    if cfg.chat_template is not None:
        tokenizer.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
    if source is not None:
        train_examples, eval_examples = user_examples(source, tokenizer, cfg, world.main)
    if torch.cuda.is_available():
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    groups, facts = prepare(model, cfg, task)
    if facts.get("fitted") and world.main:
        chosen = ", ".join(f"{k}={v}" for k, v in facts["fitted"].items())
        print(f"{cfg.method}: {chosen} chosen to fit {cfg.model} (set it to override)", file=sys.stderr)
    if overwrite and world.main:
        remove_run(out)
    model.train()
    if cfg.fsdp:
        groups = shard(model, groups)
    if cfg.compile:
        regional.compile(model)
    trainable = [p for g in groups for p in g["params"]]
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    names = [names_by_id.get(id(p), f"param{i}") for i, p in enumerate(trainable)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = lr_lambda(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: schedule(s) * lr_factor(model, s),  # an adapter's own factor (ReLoRA)
    )
    runner = model if cfg.fsdp else replicated(model, world.size)

    def evaluate_now(samples: list[dict[str, str]] | None = None) -> dict[str, float] | None:
        """The eval metrics on the first process (None elsewhere); every process must call it."""

        def run() -> dict[str, float]:
            return evaluate(model, tokenizer, task, eval_examples, cfg, progress, samples)

        return on_first(model, cfg.fsdp, world.main, run)

    history: dict[str, Any] = {"loss": [], "eval": []}
    done = 0
    ckpt = out / "checkpoint"
    if cfg.resume and not overwrite and has_checkpoint(ckpt):
        done, history = load_checkpoint(ckpt, cfg, trainable, names, optimizer, scheduler, model=model)
    reporter = open_reporters(cfg, out) if world.main else None
    samples: dict[str, list[dict[str, str]]] = {"before": [], "after": []}
    if cfg.eval_before and done == 0:
        history["before"] = evaluate_now(samples["before"])
        history["eval"].append([0, history["before"]])
        if reporter is not None and history["before"]:
            reporter.log(0, history["before"], "eval")
        model.train()
    collate = Collator(task, tokenizer, cfg.max_length)
    lengths = lengths_of(train_examples) if cfg.group_by_length else None
    per_step = expected_targets(train_examples, cfg) if source is not None else None
    global_batch = cfg.batch_size * cfg.grad_accum
    feed: Sequence[Example] | Iterator[list[Example]] = (
        train_examples.batches(done, global_batch, cfg.group_by_length)
        if isinstance(train_examples, StreamedExamples)
        else train_examples
    )
    train_seconds = 0.0
    bar = Progress(
        cfg.steps, f"{cfg.method} {task.name}", unit="step", initial=done, enabled=progress and world.main
    )

    def run_steps() -> None:
        """Steps from ``done`` to ``cfg.steps``, with the evaluations and checkpoints between them."""
        nonlocal done, per_step, train_seconds
        while done < cfg.steps:
            t0 = time.perf_counter()
            micro = [collate(chunk) for chunk in _micro_batches(feed, done, cfg, world, lengths)]
            if per_step is None and isinstance(train_examples, StreamedExamples):
                per_step = expected_targets(train_examples, cfg)  # known now: the first window is read
            loss = step(
                runner,
                micro,
                task.kind,
                optimizer,
                scheduler,
                max_grad_norm=cfg.max_grad_norm,
                precision=cfg.precision,
                world=world,
                number=done + 1,
                denominator=per_step,
            )
            done += 1
            history["loss"].append([done, loss])
            train_seconds += time.perf_counter() - t0
            bar.update(1, loss=f"{loss:.4f}")
            for callback in callbacks:
                callback(done, loss)
            if reporter is not None:
                reporter.log(done, {"loss": loss, "lr": scheduler.get_last_lr()[0]}, "train")
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                check_weights(trainable, names, done, "evaluated or saved")
                history["eval"].append([done, evaluate_now()])
                if reporter is not None and history["eval"][-1][1]:
                    reporter.log(done, history["eval"][-1][1], "eval")
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and world.main:
                check_weights(trainable, names, done, "saved")
                history["train_seconds"] = history.get("train_seconds", 0.0) + train_seconds
                train_seconds = 0.0
                save_checkpoint(ckpt, done, cfg, trainable, names, optimizer, scheduler, history, model=model)
        check_weights(trainable, names, done, "evaluated or saved")

    try:
        run_steps()
    except DivergedError as e:
        bar.close()
        if reporter is not None:
            reporter.close(None)
        raise DivergedError(f"{e}. {after_divergence(cfg, ckpt if world.main else None)}", e.step) from None
    bar.close()
    history["train_seconds"] = history.get("train_seconds", 0.0) + train_seconds
    history["eval"].append([done, evaluate_now(samples["after"])])
    if collate.padded:
        history["padding"] = {
            "tokens": collate.tokens,
            "processed": collate.padded,
            "waste": round(1 - collate.tokens / collate.padded, 4),
        }

    def finish() -> dict[str, Any]:
        stored_bytes = store(model, cfg, task, out, base_model, tokenizer)
        record = run_record(cfg, task, model, facts, history, stored_bytes, started, world.size)
        if isinstance(train_examples, StreamedExamples) and source is not None:
            source.report["train"] = dict(train_examples.report)
        if source is not None:
            record["data"] = {
                "path": source.path,
                "format": source.fmt,
                "eval": source.where["eval"],
                **source.report,
            }
        write_generations(samples, out)
        write_record(record, out)
        if reporter is not None:
            reporter.log(done, record["metrics"], "eval")
            reporter.close(record)
        return record

    record: dict[str, Any] = on_first(model, cfg.fsdp, world.main, finish) or {}
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()
    return record


def _micro_batches(
    examples: Sequence[Example] | Iterator[list[Example]],
    done: int,
    cfg: TrainConfig,
    world: World,
    lengths: Sequence[int] | None = None,
) -> list[list[Example]]:
    """This process's share of the micro-batches of step ``done``: the global batch is the next one of
    a stream's batches (``examples`` an iterator: ``--streaming``), else the examples at
    :func:`batch_positions` (:func:`grouped_positions` where the ``lengths`` of tokenised examples are
    known)."""
    global_batch = cfg.batch_size * cfg.grad_accum
    per_rank = cfg.batch_size // world.size
    if isinstance(examples, Iterator):
        chosen = next(examples)
    else:
        if lengths is not None:
            positions = grouped_positions(done, global_batch, lengths, cfg.seed)
        else:
            positions = batch_positions(done, global_batch, len(examples), cfg.seed)
        chosen = [examples[i] for i in positions]
    micro = []
    for m in range(cfg.grad_accum):
        chunk = chosen[m * cfg.batch_size : (m + 1) * cfg.batch_size]
        micro.append(chunk[world.rank * per_rank : (world.rank + 1) * per_rank])
    return micro
