"""A run that diverges stops, says where, and leaves nothing non-finite behind.

:func:`check_step` runs in every optimizer step, before the optimizer applies the update: a loss or
a gradient that is not finite (NaN or infinite, on any process) raises :class:`DivergedError`, so the
weights keep the last finite update. :func:`check_weights` runs before anything is scored or written
(an evaluation, a checkpoint, the adapter): an update can overflow the weights even from finite
gradients (a learning rate of 1e40 is infinite in float32). The loop then stops without saving; its
last checkpoint, written while everything was finite, stays as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint import checkpoint_step
from .config import TrainConfig

__all__ = ["DivergedError", "after_divergence", "check_step", "check_weights", "grads_bad"]


class DivergedError(ValueError):
    """Training produced a non-finite loss, gradient or weight at ``step`` (counted from 1)."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds (a DTensor's local shard under FSDP2)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _norms_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the norm of each of ``tensors`` is finite: one fused kernel, one read back. A norm
    overflows for values near 1e19 and above: a gradient that large counts as diverged too."""
    local = [_local(t).detach() for t in tensors]
    if not local:
        return True
    norms = torch._foreach_norm(local)
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())


def check_step(step: int, loss: float, lr: float, bad_gradients: float = 0.0) -> None:
    """Raise :class:`DivergedError` if the step's ``loss`` is not finite or ``bad_gradients`` (the
    count of processes holding a non-finite gradient, :func:`grads_bad` summed over them, so that all
    processes stop at the same step) is not 0."""
    finite_loss = math.isfinite(loss)
    if finite_loss and not bad_gradients:
        return
    what = (
        f"the loss is {loss}"
        if not finite_loss
        else f"the gradient is not finite (NaN, infinite or overflowing; the loss is {loss:.4g})"
    )
    raise DivergedError(
        f"training diverged at step {step}: {what} (learning rate {lr:.3g} at that step); the update was "
        "not applied",
        step,
    )


def grads_bad(params: Sequence[torch.nn.Parameter]) -> float:
    """1.0 if this process holds a non-finite gradient of ``params``, else 0.0 (for a sum over processes)."""
    return 0.0 if _norms_finite([p.grad for p in params if p.grad is not None]) else 1.0


def check_weights(params: Sequence[torch.nn.Parameter], names: Sequence[str], step: int, before: str) -> None:
    """Raise :class:`DivergedError` naming the first trainable parameters that hold NaN or infinite values."""
    bad = [
        n for n, p in zip(names, params, strict=True) if not bool(torch.isfinite(_local(p).detach()).all())
    ]
    if not bad:
        return
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise DivergedError(
        f"training diverged by step {step}: the weights {shown} hold NaN or infinite values; nothing was "
        f"{before}",
        step,
    )


def after_divergence(cfg: TrainConfig, ckpt: Path | None) -> str:
    """What is left of a diverged run (the checkpoint in ``ckpt``, None on processes that write
    none) and what to change."""
    written = checkpoint_step(ckpt) if ckpt is not None else None
    kept = (
        f"The last finite checkpoint is {ckpt} (step {written}); no adapter was written"
        if written is not None
        else "No adapter and no checkpoint were written"
        + (f" (--checkpoint-every {cfg.checkpoint_every})" if cfg.checkpoint_every else "")
    )
    clip = "clip the gradients (--max-grad-norm 1.0), " if not cfg.max_grad_norm else ""
    return (
        f"{kept}. Lower --lr (now {cfg.lr:g}), {clip}or warm up longer (--warmup-ratio, now "
        f"{cfg.warmup_ratio:g}), and run again with --overwrite"
    )
