"""How the wrapper runs the adapters of a fused-experts module (:class:`deltatune.contract.ExpertsLayer`):
several active adapters add their updates up, and :func:`deltatune.route` gives each adapter the
tokens of its examples. The math is :mod:`deltatune.kernels.experts`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..contract import ExpertsLayer, expert_inputs
from ..kernels.experts import ExpertUpdate, experts_forward
from .routing import Routing


def stacked_experts(
    base: nn.Module, layers: Iterable[ExpertsLayer], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The experts' output with every layer's updates: they add up, like additive layers' deltas."""
    updates: dict[str, list[ExpertUpdate]] = {}
    for layer in layers:
        for weight, ups in layer.updates().items():
            updates.setdefault(weight, []).extend(ups)
    return experts_forward(base, *expert_inputs(args, kwargs), updates)


def routed_experts(
    base: nn.Module,
    adapters: nn.ModuleDict,
    routing: Routing,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Per example: fused experts see the batch's tokens flattened, ``(batch · seq, hidden)``, as
    every MoE block of transformers passes them, so example ``i``'s tokens are the ``i``-th of
    ``batch`` equal runs, and each adapter's update acts on its examples' runs only."""
    hidden, index, weights = expert_inputs(args, kwargs)
    examples = len(routing)
    if hidden.shape[0] % examples:
        raise ValueError(
            f"route(): {examples} adapter names given, but the fused experts at this module see "
            f"{hidden.shape[0]} tokens, not a whole number per example"
        )
    per = hidden.shape[0] // examples
    updates: dict[str, list[ExpertUpdate]] = {}
    for name in routing.rows:
        if name not in adapters:
            continue
        layer = adapters[name]
        if not isinstance(layer, ExpertsLayer):
            raise ValueError(
                f"route(): adapter {name!r} is a {type(layer).__name__} on fused experts that "
                "another routed adapter adapts by their weights; these cannot be mixed per example"
            )
        rows = None
        if not routing.covers_all(name):
            mask = torch.zeros(examples, device=hidden.device)
            mask[routing.indices(name, hidden.device)] = 1.0
            rows = mask.repeat_interleave(per)
        for weight, ups in layer.updates(rows).items():
            updates.setdefault(weight, []).extend(ups)
    return experts_forward(base, hidden, index, weights, updates)
