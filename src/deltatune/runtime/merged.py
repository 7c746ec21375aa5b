"""What a merged module is: the base with an adapter layer's update written into its weight.

:func:`deltatune.merge` (the verb, in :mod:`deltatune.runtime.core`) replaces each adapted module by
:func:`merged_module`; a method whose merge is not a plain ``W + delta_weight()`` (DoRA's rescaled
columns, SAID's projected update) builds its own with :func:`deltatune.contract.merged_linear`.
"""

from __future__ import annotations

from torch import nn

from ..contract.layer import as_layer, merged_linear

__all__ = ["merged_module"]


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
    own = as_layer(layer)
    merged = own.merged(base)
    if merged is not None:
        return merged
    delta = own.delta_weight()
    if delta is None:
        raise ValueError(f"{type(layer).__name__} at {path!r} has neither merged() nor delta_weight()")
    return merged_linear(base, delta)
