"""The training loop: any registered method (or full fine-tuning) on any task, one code path.

* :func:`~deltatune.train.prepare.prepare` applies the method and returns AdamW parameter groups.
* :func:`step` (:mod:`deltatune.train.update`) is one optimizer step: forward and backward over the
  micro-batches of gradient accumulation, the loss divided by the *global* count of examples (or
  target tokens), clipping, the optimizer and scheduler steps. Drive it yourself for a loop of your own.
* :func:`train` runs a :class:`~deltatune.train.config.TrainConfig`: data in a fixed order
  (:func:`~deltatune.train.batches.batch_positions`), warmup then linear or cosine decay, fp32 or
  bf16 autocast, evaluation (:mod:`deltatune.train.evaluation`), checkpoints and resume
  (:mod:`deltatune.train.checkpoint`), DDP under ``torchrun``; it writes the adapter,
  ``metrics.json`` and ``curves.png``.

``TrainConfig``, ``Collator``, ``prompt_of``, ``batch_positions``, ``evaluate``, ``step``, ``World`` and
``init_world`` are importable
from here too.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..kernels.lowrank import adapter_precision_as
from ..runtime import regional
from ..runtime.checkpointing import checkpoint_blocks
from ..runtime.stepping import lr_factor
from .batches import Collator, batch_positions, prompt_of
from .checkpoint import check_out_folder, has_checkpoint, load_checkpoint, remove_run, save_checkpoint
from .config import TrainConfig
from .data import Example
from .divergence import DivergedError, after_divergence, check_weights
from .evaluation import evaluate
from .models import add_tokens, load_model
from .prepare import prepare
from .progress import Progress
from .records import run_record, store, write_generations, write_record
from .reporting import Reporter, open_reporters
from .sharding import on_first, replicated, shard
from .streaming import StreamedExamples
from .tasks import EVAL_SAMPLE_SEED, Task, get_task, hold_out, load_split, sample
from .update import step
from .userdata import UserData, expected_targets, lengths_of, open_for, user_examples
from .world import World, init_world, micro_batches

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
    if cfg.batch_size % world.size:
        raise ValueError(
            f"TrainConfig.batch_size {cfg.batch_size} must be divisible by the {world.size} processes"
        )
    # The adapter records cfg.model as its base only when the harness loaded it; a model passed in
    # is recorded by what it says of itself (deltatune.formats.io.base_model_of).
    base_model = cfg.model if model is None else None
    model, tokenizer, train_examples, eval_examples, validation = _model_and_data(
        cfg, task, source, world, model, tokenizer
    )
    groups, facts = prepare(model, cfg, task, tokenizer)
    if facts.get("fitted") and world.main:
        chosen = ", ".join(f"{k}={v}" for k, v in facts["fitted"].items())
        print(f"{cfg.method}: {chosen} chosen to fit {cfg.model} (set it to override)", file=sys.stderr)
    if overwrite and world.main:
        remove_run(out)
    model.train()
    if cfg.fsdp:
        groups = shard(model, groups)
    if cfg.activation_checkpointing:  # per block, before sharding and compiling the same blocks
        checkpoint_blocks(model)
    if cfg.compile:
        regional.compile(model)
    run = _Steps.start(
        cfg, world, task, model, tokenizer, groups, train_examples, eval_examples, out, progress
    )
    run.validation_examples = validation
    run.resume_or_evaluate_before(resume=cfg.resume and not overwrite)
    run.run(callbacks, per_step=expected_targets(train_examples, cfg) if source is not None else None)
    run.evaluate_after()

    def finish() -> dict[str, Any]:
        stored_bytes = store(model, cfg, task, out, base_model, tokenizer)
        record = run_record(cfg, task, model, facts, run.history, stored_bytes, started, world.size)
        if source is not None:
            record["data"] = _data_report(source, train_examples)
        write_generations(run.samples, out)
        write_record(record, out)
        if run.reporter is not None:
            run.reporter.log(run.done, record["metrics"], "eval")
            run.reporter.close(record)
        return record

    record: dict[str, Any] = on_first(model, cfg.fsdp, world.main, finish) or {}
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()
    return record


def _model_and_data(
    cfg: TrainConfig,
    task: Task,
    source: UserData | None,
    world: World,
    model: nn.Module | None,
    tokenizer: Any,
) -> tuple[nn.Module, Any, Sequence[Example] | StreamedExamples, Sequence[Example], Sequence[Example]]:
    """The model (``cfg.model`` unless one is given), on the GPU where there is one, its tokenizer
    (with ``cfg.chat_template``), and the training, evaluation and validation examples: the task's
    splits, or the user's data (tokenised with that tokenizer); ``cfg.validation`` of the training
    examples held out (:func:`~deltatune.train.tasks.hold_out`) before ``cfg.train_limit`` applies."""
    train_examples: Sequence[Example] | StreamedExamples
    if source is None:
        train_examples = load_split(task, "train", cfg.data_dir)
        eval_examples = load_split(task, "eval", cfg.data_dir, limit=cfg.eval_limit, seed=EVAL_SAMPLE_SEED)
    if model is None:
        model, tokenizer = load_model(cfg.model, task.kind, task.num_labels or None, seed=cfg.seed)
    if tokenizer is None:
        raise ValueError("train(model=...) needs the model's tokenizer too (tokenizer=...)")
    if cfg.chat_template is not None:
        tokenizer.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
    if cfg.add_tokens:
        add_tokens(model, tokenizer, cfg.add_tokens)  # (before tokenising: the data may use them)
    if source is not None:
        train_examples, eval_examples = user_examples(source, tokenizer, cfg, world.main)
    validation: Sequence[Example] = ()
    if cfg.validation and not isinstance(train_examples, StreamedExamples):
        train_examples, validation = hold_out(train_examples, cfg.validation, cfg.data or f"task {task.name}")
    if source is None and not isinstance(train_examples, StreamedExamples):  # (the user's: as it is read)
        train_examples = sample(train_examples, cfg.train_limit, cfg.seed if cfg.train_limit else None)
    if torch.cuda.is_available():
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    return model, tokenizer, train_examples, eval_examples, validation


def _data_report(source: UserData, train_examples: Sequence[Example] | StreamedExamples) -> dict[str, Any]:
    """``metrics.json``'s ``data`` of a run on the user's data: the file, its format and what was read."""
    if isinstance(train_examples, StreamedExamples):
        source.report["train"] = dict(train_examples.report)
    return {"path": source.path, "format": source.fmt, "eval": source.where["eval"], **source.report}


@dataclass
class _Steps:
    """A run's training from its first step (or its checkpoint's) to ``cfg.steps``: the optimizer and
    its schedule, the data feed, and the evaluations, checkpoints and reports between the steps."""

    cfg: TrainConfig
    world: World
    task: Task
    model: nn.Module
    tokenizer: Any
    trainable: list[nn.Parameter]
    names: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_examples: Sequence[Example] | StreamedExamples
    eval_examples: Sequence[Example]
    ckpt: Path
    reporter: Reporter | None
    progress: bool
    runner: nn.Module  # the model, or its DistributedDataParallel wrapper
    collate: Collator
    validation_examples: Sequence[Example] = ()
    done: int = 0
    history: dict[str, Any] = field(default_factory=lambda: {"loss": [], "eval": []})
    samples: dict[str, list[dict[str, str]]] = field(default_factory=lambda: {"before": [], "after": []})
    train_seconds: float = 0.0

    @classmethod
    def start(
        cls,
        cfg: TrainConfig,
        world: World,
        task: Task,
        model: nn.Module,
        tokenizer: Any,
        groups: list[dict[str, Any]],
        train_examples: Sequence[Example] | StreamedExamples,
        eval_examples: Sequence[Example],
        out: Path,
        progress: bool,
    ) -> _Steps:
        """AdamW over ``groups`` with ``cfg``'s schedule (times an adapter's own factor: ReLoRA)."""
        trainable = [p for g in groups for p in g["params"]]
        names_by_id = {id(p): n for n, p in model.named_parameters()}
        names = [names_by_id.get(id(p), f"param{i}") for i, p in enumerate(trainable)]
        optimizer = torch.optim.AdamW(groups, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
        schedule = lr_lambda(cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s) * lr_factor(model, s))
        reporter = open_reporters(cfg, out) if world.main else None
        return cls(
            cfg,
            world,
            task,
            model,
            tokenizer,
            trainable,
            names,
            optimizer,
            scheduler,
            train_examples,
            eval_examples,
            out / "checkpoint",
            reporter,
            progress=progress,
            runner=model if cfg.fsdp else replicated(model, world.size),
            collate=Collator(task, tokenizer, cfg.max_length),
        )

    def evaluate_now(
        self, samples: list[dict[str, str]] | None = None, examples: Sequence[Example] | None = None
    ) -> dict[str, float] | None:
        """The metrics on ``examples`` (the eval split by default) on the first process (None
        elsewhere); every process must call it."""
        on = self.eval_examples if examples is None else examples

        def run() -> dict[str, float]:
            return evaluate(self.model, self.tokenizer, self.task, on, self.cfg, self.progress, samples)

        return on_first(self.model, self.cfg.fsdp, self.world.main, run)

    def resume_or_evaluate_before(self, *, resume: bool) -> None:
        """Continue from the checkpoint (``resume`` and there is one); at step 0, evaluate first where
        ``cfg.eval_before`` asks."""
        if resume and has_checkpoint(self.ckpt):
            self.done, self.history = load_checkpoint(
                self.ckpt,
                self.cfg,
                self.trainable,
                self.names,
                self.optimizer,
                self.scheduler,
                model=self.model,
            )
        if self.cfg.eval_before and self.done == 0:
            self.history["before"] = self.evaluate_now(self.samples["before"])
            self.history["eval"].append([0, self.history["before"]])
            if self.reporter is not None and self.history["before"]:
                self.reporter.log(0, self.history["before"], "eval")
            self.model.train()

    def run(self, callbacks: Sequence[Callable[[int, float], None]], per_step: float | None) -> None:
        """Steps from ``done`` to ``cfg.steps``; a divergence closes the bar and the reporters and is
        raised with what to do about it (:func:`~deltatune.train.divergence.after_divergence`)."""
        cfg = self.cfg
        bar = Progress(
            cfg.steps,
            f"{cfg.method} {self.task.name}",
            unit="step",
            initial=self.done,
            enabled=self.progress and self.world.main,
        )
        try:
            self._steps(bar, callbacks, per_step)
        except DivergedError as e:
            bar.close()
            if self.reporter is not None:
                self.reporter.close(None)
            where = self.ckpt if self.world.main else None
            raise DivergedError(f"{e}. {after_divergence(cfg, where)}", e.step) from None
        bar.close()
        self.history["train_seconds"] = self.history.get("train_seconds", 0.0) + self.train_seconds

    def _steps(
        self, bar: Progress, callbacks: Sequence[Callable[[int, float], None]], per_step: float | None
    ) -> None:
        cfg, examples, collate = self.cfg, self.train_examples, self.collate
        lengths = lengths_of(examples) if cfg.group_by_length else None
        feed: Sequence[Example] | Iterator[list[Example]] = (
            examples.batches(self.done, cfg.batch_size * cfg.grad_accum, cfg.group_by_length)
            if isinstance(examples, StreamedExamples)
            else examples
        )
        while self.done < cfg.steps:
            t0 = time.perf_counter()
            micro = [collate(chunk) for chunk in micro_batches(feed, self.done, cfg, self.world, lengths)]
            if per_step is None and isinstance(examples, StreamedExamples):
                per_step = expected_targets(examples, cfg)  # known now: the first window is read
            loss = step(
                self.runner,
                micro,
                self.task.kind,
                self.optimizer,
                self.scheduler,
                max_grad_norm=cfg.max_grad_norm,
                precision=cfg.precision,
                world=self.world,
                number=self.done + 1,
                denominator=per_step,
            )
            self.done += 1
            self.history["loss"].append([self.done, loss])
            self.train_seconds += time.perf_counter() - t0
            bar.update(1, loss=f"{loss:.4f}")
            for callback in callbacks:
                callback(self.done, loss)
            self._between_steps(loss)
        check_weights(self.trainable, self.names, self.done, "evaluated or saved")

    def _between_steps(self, loss: float) -> None:
        """After step ``done``: its report, and the evaluation and checkpoint that fall due."""
        cfg, done = self.cfg, self.done
        if self.reporter is not None:
            self.reporter.log(done, {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}, "train")
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            check_weights(self.trainable, self.names, done, "evaluated or saved")
            self.history["eval"].append([done, self.evaluate_now()])
            if self.reporter is not None and self.history["eval"][-1][1]:
                self.reporter.log(done, self.history["eval"][-1][1], "eval")
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and self.world.main:
            check_weights(self.trainable, self.names, done, "saved")
            self.history["train_seconds"] = self.history.get("train_seconds", 0.0) + self.train_seconds
            self.train_seconds = 0.0
            save_checkpoint(
                self.ckpt,
                done,
                cfg,
                self.trainable,
                self.names,
                self.optimizer,
                self.scheduler,
                self.history,
                model=self.model,
            )

    def evaluate_after(self) -> None:
        """The final evaluation (with the samples ``generations.jsonl`` holds), and the padding the
        batches carried."""
        self.history["eval"].append([self.done, self.evaluate_now(self.samples["after"])])
        if self.validation_examples:  # what settings are chosen by (metrics.json's "validation")
            self.history["validation"] = self.evaluate_now(examples=self.validation_examples)
        collate = self.collate
        if collate.padded:
            self.history["padding"] = {
                "tokens": collate.tokens,
                "processed": collate.padded,
                "waste": round(1 - collate.tokens / collate.padded, 4),
            }
