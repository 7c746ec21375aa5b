"""Activation checkpointing per transformer block: keep each block's inputs, recompute the rest in backward.

:func:`checkpoint_blocks` makes every block that :mod:`deltatune.anatomy` finds run its forward through
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` while the model trains with gradients on:
autograd keeps only the blocks' inputs, and the backward pass recomputes one block's activations at a
time (about one more forward pass of FLOPs). Gradients are those of the plain model (the recomputation
replays the same code and random state). The block's class is swapped for a subclass, so parameter
names, state dicts, saved adapters, ``torch.compile`` of the block (``deltatune.compile``) and FSDP2's
per-block sharding are unchanged; :func:`restore` swaps it back.

This is what TRL's ``gradient_checkpointing`` and torchtune's ``enable_activation_checkpointing`` do,
for any model whose blocks are known, with transformers' own flag left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import anatomy

__all__ = ["checkpoint_blocks", "is_checkpointed", "restore"]

_SUBCLASSES: dict[type, type] = {}
#: A block's KV cache, by the names transformers releases give it.
_CACHE_KEYS = ("past_key_values", "past_key_value", "layer_past")


class _Checkpointed:
    """Marker base of the swapped-in block classes (their original class is ``__bases__[1]``)."""


def _subclass(cls: type) -> type:
    if cls not in _SUBCLASSES:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            plain = super(subclass, self).forward  # type: ignore[misc,arg-type]
            if self.training and torch.is_grad_enabled():
                # A KV cache would grow again when backward replays the block (the recomputed keys then
                # differ from the saved ones): training has no use for it, so the block gets none.
                for key in _CACHE_KEYS:
                    if kwargs.get(key) is not None:
                        kwargs[key] = None
                if kwargs.get("use_cache"):
                    kwargs["use_cache"] = False
                return checkpoint(plain, *args, use_reentrant=False, **kwargs)
            return plain(*args, **kwargs)

        subclass = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {"forward": forward})
        _SUBCLASSES[cls] = subclass
    return _SUBCLASSES[cls]


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Checkpoint every transformer block of ``model`` in place; return their paths.

    Raises:
        ValueError: a model whose blocks :mod:`deltatune.anatomy` cannot find (describe it with an
            ``Anatomy``).
    """
    try:
        blocks = anatomy.describe(model).blocks
    except ValueError as e:
        raise ValueError(f"activation checkpointing works block by block; {e}") from None
    for path in blocks:
        block = model.get_submodule(path)
        if not isinstance(block, _Checkpointed):
            block.__class__ = _subclass(type(block))
    return list(blocks)


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module, _Checkpointed)


def restore(model: nn.Module) -> None:
    """Undo :func:`checkpoint_blocks`: every checkpointed block gets its own class back."""
    for module in model.modules():
        if isinstance(module, _Checkpointed):
            module.__class__ = type(module).__bases__[1]
