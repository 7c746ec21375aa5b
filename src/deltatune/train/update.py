"""One optimizer step: :func:`step` (:mod:`deltatune.train.loop` runs it; drive it yourself for a loop
of your own): forward and backward over the micro-batches of gradient accumulation, the loss divided
by the *global* count of examples (or target tokens), then the checked update."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ..runtime.stepping import needs_step_hooks, on_step, regularization
from .batches import autocast, count_of, device_of, loss_sum, to_device
from .divergence import check_step, grads_bad
from .world import World, all_reduce_sum

__all__ = ["ONE_PROCESS", "step"]

#: The world of a run without ``torchrun``.
ONE_PROCESS = World()


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
    world: World = ONE_PROCESS,
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
        world: this process's rank and the number of processes (:func:`~deltatune.train.world.init_world`).
        number: which optimizer step this is (from 1). Needed when an adapter acts between steps
            (:mod:`deltatune.runtime.stepping`): its regularizer joins the loss of the last micro-batch and
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
    inner = getattr(model, "module", model)  # DistributedDataParallel's wrapped model
    hooked = inner if needs_step_hooks(inner) else None
    if hooked is not None and number is None:
        raise ValueError(
            "step(): this model's adapter acts between optimizer steps (deltatune.runtime.stepping); "
            "pass number= (the optimizer step, counted from 1)"
        )
    batches = [to_device(dict(b), device_of(model)) for b in micro_batches]
    if denominator is None:
        denominator = all_reduce_sum(float(sum(count_of(b, kind) for b in batches)), world)
    loss_value = all_reduce_sum(_backward(model, batches, kind, world, denominator, precision, hooked), world)
    _update(optimizer, scheduler, loss_value, world, number, max_grad_norm, hooked)
    return loss_value


def _backward(
    model: nn.Module,
    batches: list[dict[str, Any]],
    kind: str,
    world: World,
    denominator: float,
    precision: str,
    hooked: nn.Module | None,
) -> float:
    """Forward and backward over ``batches``, gradients synced once (after the last); this process's
    part of the step's loss. ``hooked``: the model whose regularizer joins the last loss."""
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
                if hooked is not None and last:  # once per step, after the last forward
                    loss = loss + regularization(hooked).to(loss.device)
                loss.backward()
        except RuntimeError as e:
            if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
                size = len(batch["labels"])
                raise ValueError(
                    f"a batch of {size} examples does not fit in memory on {device_of(model)}; lower "
                    f"--batch-size and raise --grad-accum to keep the global batch "
                    f"({size * len(batches) * world.size})"
                ) from e
            raise
        loss_value += float(task_loss) / world.size
    return loss_value


def _update(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loss_value: float,
    world: World,
    number: int | None,
    max_grad_norm: float,
    hooked: nn.Module | None,
) -> None:
    """The update of a step whose gradients are in: refused (on every process) where the loss or a
    gradient is not finite; else clipped, applied, the adapter's ``on_step`` (``hooked``), the
    scheduler's step, and the gradients cleared."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bad = all_reduce_sum(grads_bad(params), world)
    if bad or not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        check_step(number or 0, loss_value, float(optimizer.param_groups[0]["lr"]), bad)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if hooked is not None:
        assert number is not None
        on_step(hooked, number, optimizer)
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
