"""FSDP2 under ``torchrun``: shard the model block by block, train, gather it back to evaluate and save.

``deltatune train --fsdp true`` (``TrainConfig.fsdp``) calls :func:`shard` once the adapter is in
place: every transformer block (located by :mod:`deltatune.anatomy`) and then the whole model become
``fully_shard`` units, so each process keeps 1/N of the frozen base and of the adapter, the optimizer
holds only the adapter's shards, and the gradients are reduce-scattered (averaged, as DDP does). The
parameters become new (sharded ``DTensor``) objects, so the optimizer's groups and each adapter's list
of trainable parameters are pointed at them by name.

Evaluation and saving run on the first process inside :func:`gathered`: every process unshards the
model (one all-gather each), the first one runs plain forwards and writes plain tensors while the
others wait, and all of them shard it again. Multi-node: launch the same command with ``torchrun
--nnodes N --node-rank R --rdzv-endpoint HOST:PORT`` (NCCL on GPUs, gloo on CPUs).

Not yet under FSDP (refused by :class:`~deltatune.train.config.TrainConfig` and :func:`shard`, with
the reason): periodic checkpoints (``--checkpoint-every`` must be 0) and methods that act between
optimizer steps (AdaLoRA, ReLoRA, Delta-LoRA, LoRA-drop: their hooks edit whole tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from torch import nn

from .. import anatomy
from ..runtime import wrapper
from ..runtime.stepping import needs_step_hooks
from .batches import device_of

__all__ = ["gathered", "on_first", "replicated", "shard"]

T = TypeVar("T")


def replicated(model: nn.Module, processes: int) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when ``torchrun`` started several processes,
    else itself (the other way of spreading a run: :func:`shard`)."""
    if processes == 1:
        return model
    device = device_of(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def shard(model: nn.Module, groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``fully_shard`` every block of ``model`` and then the model; return the optimizer ``groups``
    with their parameters replaced by the sharded ones (the same names)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "TrainConfig.fsdp: sharding needs the processes of a torchrun launch "
            "(torchrun --nproc-per-node N -m deltatune.cli train ... --fsdp true)"
        )
    if wrapper.has_adapters(model) and needs_step_hooks(model):
        names = ", ".join(
            type(wrapper.attachment_of(model).info(n).method).__name__
            for n in wrapper.attachment_of(model).active
        )
        raise ValueError(
            f"TrainConfig.fsdp: {names} acts between optimizer steps on whole tensors, which FSDP "
            "shards; train it with DDP (torchrun without --fsdp) or on one process"
        )
    try:
        blocks = anatomy.describe(model).blocks
    except ValueError as e:
        raise ValueError(f"TrainConfig.fsdp shards block by block: {e}") from None
    before = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    for path in blocks:
        fully_shard(model.get_submodule(path))
    fully_shard(model)
    after = dict(model.named_parameters(remove_duplicate=False))
    mapping = {pid: after[name] for pid, name in before.items() if name in after}
    if wrapper.has_adapters(model):
        wrapper.attachment_of(model).replace_parameters(mapping)
    return [{**g, "params": [mapping[id(p)] for p in g["params"]]} for g in groups]


def _units(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model holds whole (unsharded) parameters on every process, so one process
    alone can run it and read it; on exit every process shards it again. Call it on every process."""
    units = _units(model)
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def on_first(model: nn.Module, sharded: bool, main: bool, fn: Callable[[], T]) -> T | None:
    """``fn()`` on the first process (None on the others); for a sharded model every process gathers
    it first and waits for the first one to finish."""
    if not sharded:
        return fn() if main else None
    import torch.distributed as dist

    with gathered(model):
        result = fn() if main else None
        dist.barrier()
    return result
