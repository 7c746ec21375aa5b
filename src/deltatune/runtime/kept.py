"""What a training step's autograd keeps for backward, by storage and by transformer block.

:func:`kept_by_step` records it while a step's forward pass runs, on real tensors or on PyTorch's meta
device: :func:`deltatune.runtime.estimate.estimate` traces with it, and the tests and benchmarks measure
real steps with it, so both sides of a comparison count by one rule (each storage once, weights apart).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Kept", "kept_by_step"]


@dataclasses.dataclass
class Kept:
    """What a training step's autograd keeps for backward, by storage (each once, weights apart): its
    size, where it was saved (a block's index, or None: outside every block), and which storages
    entered the blocks. :func:`kept_by_step` measures it on real tensors or, for :func:`estimate`, on
    the meta device: the one rule both sides of a comparison use."""

    sizes: dict[int, int] = dataclasses.field(default_factory=dict)
    owner: dict[int, int | None] = dataclasses.field(default_factory=dict)
    inputs: dict[int, int] = dataclasses.field(default_factory=dict)  # storage -> bytes
    logits: dict[int, torch.dtype] = dataclasses.field(default_factory=dict)  # vocabulary-wide, by size
    block_flops: int = 0  # the blocks' forward FLOPs (with a FLOP counter given)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def largest_block(self) -> int:
        """The most any one block keeps of its own (its inputs apart): what recomputing it holds."""
        per_block: dict[int, int] = {}
        for k, b in self.sizes.items():
            block = self.owner[k]
            if block is not None and k not in self.inputs:
                per_block[block] = per_block.get(block, 0) + b
        return max(per_block.values(), default=0)

    def outside(self) -> int:
        """What is kept outside every block (the blocks' inputs apart)."""
        return sum(b for k, b in self.sizes.items() if self.owner[k] is None and k not in self.inputs)

    def checkpointed(self) -> int:
        """Kept under per-block checkpointing: what is saved outside the blocks, the blocks' inputs, and
        the largest block's own saved tensors (its recomputation, one block at a time)."""
        return self.outside() + sum(self.inputs.values()) + self.largest_block()

    def logits_dtype(self) -> str:
        """The dtype of the largest vocabulary-wide tensor kept ("" if none)."""
        return str(self.logits[max(self.logits)]).removeprefix("torch.") if self.logits else ""


def kept_by_step(
    net: nn.Module,
    forward: Callable[[], torch.Tensor],
    blocks: Sequence[nn.Module] = (),
    flops: Any = None,
) -> tuple[Kept, torch.Tensor]:
    """Run ``forward`` (a training step's forward pass, returning the loss) and record what autograd
    keeps of it (:class:`Kept`), attributing each storage to the block of ``blocks`` it was saved in.
    ``flops``: a running ``FlopCounterMode`` whose count gives each block's forward FLOPs."""
    weights = {t.untyped_storage()._cdata for t in [*net.parameters(), *net.buffers()]}
    kept = Kept()
    vocab = getattr(getattr(net, "config", None), "vocab_size", None)
    current: list[int | None] = [None]
    started = [0]
    # The blocks' inputs held until the forward ends: a storage freed earlier could see its address,
    # the key here, reused by one that autograd keeps, which would then be taken for an input.
    held: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            kept.sizes[storage._cdata] = storage.nbytes()
            kept.owner.setdefault(storage._cdata, current[0])
            if vocab and t.dim() >= 2 and t.shape[-1] == vocab and t.is_floating_point():
                kept.logits[storage.nbytes()] = t.dtype
        return t

    def enter(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current[0] = index
            started[0] = flops.get_total_flops() if flops is not None else 0
            for value in [*args, *kwargs.values()]:
                if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata not in weights:
                    kept.inputs[value.untyped_storage()._cdata] = value.untyped_storage().nbytes()
                    held.append(value)

        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        current[0] = None
        if flops is not None:
            kept.block_flops += flops.get_total_flops() - started[0]

    handles = [b.register_forward_pre_hook(enter(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(leave) for b in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
    finally:
        for h in handles:
            h.remove()
        held.clear()
    return kept, loss
