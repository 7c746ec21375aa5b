"""What a merged module is: the base with an adapter layer's update written into its weight.

:func:`deltatune.merge` (the verb, in :mod:`deltatune.core`) replaces each adapted module by
:func:`merged_module`; a method whose merge is not a plain ``W + delta_weight()`` (DoRA's rescaled
columns, SAID's projected update) builds its own with :func:`merged_linear`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["merged_linear", "merged_module"]


def merged_linear(base: nn.Module, delta: torch.Tensor) -> nn.Module:
    """A plain copy of ``base`` whose weight is ``base.weight + delta`` (added in float32)."""
    weight = base.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"cannot merge into {type(base).__name__}: it has no weight tensor")
    if delta.shape != weight.shape:
        raise ValueError(f"delta_weight has shape {tuple(delta.shape)}, weight has {tuple(weight.shape)}")
    new = copy.copy(base)
    new._parameters = dict(base._parameters)
    new._buffers = dict(base._buffers)
    new._modules = dict(base._modules)
    merged = (weight.detach().float() + delta.detach().float().to(weight.device)).to(weight.dtype)
    new.weight = nn.Parameter(merged, requires_grad=False)
    return new


def merged_module(layer: nn.Module, base: nn.Module, path: str, dequantize: bool = False) -> nn.Module:
    """``base`` with ``layer``'s update merged in: the layer's own ``merged(base)`` where it has one,
    else :func:`merged_linear` of its ``delta_weight()``; a 4-bit base only with ``dequantize``."""
    if getattr(base, "quantized", False):
        # A quantised base (e.g. NF4): re-quantising W + ΔW would lose most of the update.
        if not dequantize:
            raise ValueError(
                f"merge: {path!r} has a quantised base ({type(base).__name__}); merging into it would "
                "re-quantise and lose the update: call merge(model, dequantize=True) to get a float "
                "module holding dequantised W + ΔW, or keep the adapter attached"
            )
        base = base.dequantize()  # type: ignore[operator]
    merged = getattr(layer, "merged", None)
    if merged is not None:
        out: nn.Module = merged(base)
        return out
    delta_weight = getattr(layer, "delta_weight", None)
    if delta_weight is None:
        raise ValueError(f"{type(layer).__name__} at {path!r} has neither merged() nor delta_weight()")
    return merged_linear(base, delta_weight())
