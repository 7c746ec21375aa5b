"""The processes of a run: this one's rank among them (:class:`World`, 1 without ``torchrun``),
sums over all of them, and each one's share of a step's examples (:func:`micro_batches`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .batches import batch_positions, grouped_positions
from .config import TrainConfig
from .data import Example

__all__ = ["World", "all_reduce_sum", "init_world", "micro_batches"]


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


def all_reduce_sum(value: float, world: World) -> float:
    if world.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def micro_batches(
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
