"""The method contract: what a method and its layers provide. Read this package first.

* :mod:`.method`: :class:`Method`, the base of every method config, with its concerns
  (:class:`Placement`, :class:`SharedState`, :class:`StepHooks`, :class:`Storage`) and every default
  written where a reader sees it; :class:`AdapterView`, what a hook may ask of the attachment.
* :mod:`.layer`: what ``wrap`` returns: :class:`AdditiveLayer`, :class:`ReplacingLayer` and the
  low-rank :class:`LowRankLayer` (give ``factors()``, inherit ``delta``, ``delta_weight`` and
  ``lowrank_factors``).
* :mod:`.fields`: the field vocabulary (``param(default, check, help)`` with ``Int``, ``Float``,
  ...): one validator, one error style, one table for ``deltatune methods``.
* :mod:`.suite`: :class:`Suite`, what the invariant suite needs to run a method.
* :mod:`.registry`: :func:`register` and the functions that read a method as data.

PEFT's file formats are translated apart from the methods, in :mod:`deltatune.formats.peft`; the
low-rank family builds on :mod:`deltatune.methods.lowrank.base`.

Example: a complete method (a learned per-channel scale added to a Linear's output):

    >>> import dataclasses, torch
    >>> from torch import nn
    >>> from typing import ClassVar
    >>> from deltatune.contract import AdditiveLayer, Method, register
    >>> @register
    ... @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class OutputScale(Method):
    ...     name: ClassVar[str] = "doctest_output_scale"
    ...     identity_at_init: ClassVar[bool] = True
    ...     supports_mixed_batch: ClassVar[bool] = True
    ...     def wrap(self, base, shared, *, path, generator):
    ...         return ScaleLayer(base.out_features)
    ...     def parameter_count(self, base):
    ...         return base.out_features
    ...     def stored_bytes(self, base):
    ...         return 4 * base.out_features
    >>> class ScaleLayer(AdditiveLayer):
    ...     reads = "output"
    ...     def __init__(self, width):
    ...         super().__init__()
    ...         self.gain = nn.Parameter(torch.zeros(width))
    ...     def delta(self, y):
    ...         return y * self.gain
    >>> import deltatune as dt
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> x = torch.randn(3, 4)
    >>> before = net(x)
    >>> att = dt.inject(net, OutputScale(), targets=["0", "2"])
    >>> torch.equal(net(x), before), att.closed_form("default")  # identity at init; 4 + 2 gains
    (True, (6, 24))
    >>> from deltatune.contract import REGISTRY
    >>> del REGISTRY["doctest_output_scale"]
"""

from __future__ import annotations

from .layer import (
    SHARED_ATTR,
    AdditiveLayer,
    ExpertsLayer,
    Layer,
    LowRankLayer,
    ReplacingLayer,
    Wrapped,
    as_layer,
    dropout_module,
    expert_inputs,
    export_state,
    import_state,
    in_weight_layout,
    lowrank_factors,
    merged_linear,
    module_tensors,
    reads_output,
    shallow_copy,
)
from .method import AdapterView, Method, Placement, SharedState, StepHooks, Storage, layers_of
from .registry import (
    CAPABILITIES,
    REGISTRY,
    closed_form,
    config_for,
    float_weight_reason,
    hooks,
    method_fields,
    method_from_config,
    register,
)
from .suite import Suite

__all__ = [
    "CAPABILITIES",
    "REGISTRY",
    "SHARED_ATTR",
    "AdapterView",
    "AdditiveLayer",
    "ExpertsLayer",
    "Layer",
    "LowRankLayer",
    "Method",
    "Placement",
    "ReplacingLayer",
    "SharedState",
    "StepHooks",
    "Storage",
    "Suite",
    "Wrapped",
    "as_layer",
    "closed_form",
    "config_for",
    "dropout_module",
    "expert_inputs",
    "export_state",
    "float_weight_reason",
    "hooks",
    "import_state",
    "in_weight_layout",
    "layers_of",
    "lowrank_factors",
    "merged_linear",
    "method_fields",
    "method_from_config",
    "module_tensors",
    "reads_output",
    "register",
    "shallow_copy",
]
