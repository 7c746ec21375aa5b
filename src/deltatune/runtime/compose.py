"""Adapters made from adapters: ``combine`` (an exact weighted sum of several adapters) and
``reconfigure`` (an adapter re-created with another configuration of its method, keeping every tensor
that still fits: a continual adapter grown by one task).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> net = nn.Sequential(nn.Linear(8, 8))
    >>> _ = dt.inject(net, dt.LoRA(rank=2), targets=["0"], name="a")
    >>> _ = dt.inject(net, dt.LoRA(rank=2), targets=["0"], name="b")
    >>> att = dt.combine(net, {"a": 0.5, "b": 0.5}, name="mean")
    >>> att.info("mean").method.rank  # the factors concatenate: exact, rank 2 + 2
    4
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..contract import SHARED_ATTR, Method, config_for, export_state, import_state, module_tensors
from .core import build_layers, check_adapter_name
from .state import adapter_state
from .wrapper import AdapterInfo, Attachment, all_or_nothing, attachment_of

__all__ = ["combine", "reconfigure"]


def reconfigure(model: nn.Module, name: str, method: Method) -> Attachment:
    """Re-create adapter ``name`` with another config of its method, on the same targets, overrides
    and seed, keeping every tensor whose name and shape still fit; the others start as the method
    initialises them (a continual adapter grown by one task keeps the earlier tasks' tensors).

    The adapter keeps its name, its place among the active adapters and its full module copies; its
    layers are new modules, so build a new optimizer afterwards.
    """
    att = attachment_of(model)
    info = att.info(name)
    if type(method) is not type(info.method):
        raise ValueError(
            f"reconfigure: adapter {name!r} is {type(info.method).__name__}; it cannot become "
            f"{type(method).__name__} (inject a new adapter instead)"
        )
    configs = {p: config_for(method, p, info.overrides) for p in info.targets}
    bases = {p: att.wrappers[p].base for p in info.targets}
    shared, layers = build_layers(method, configs, bases, info.seed)
    old = adapter_state(model, name)
    owners: dict[str, nn.Module] = dict(layers)
    if shared is not None:
        owners[SHARED_ATTR] = shared
    for owner, module in owners.items():  # (the shared state has no export form: its state_dict)
        fresh = module_tensors(module) if owner == SHARED_ATTR else export_state(module)
        kept = {
            k: (old[f"{owner}.{k}"] if f"{owner}.{k}" in old and old[f"{owner}.{k}"].shape == v.shape else v)
            for k, v in fresh.items()
        }
        if owner == SHARED_ATTR:
            module.load_state_dict(kept, strict=True)
        else:
            import_state(module, kept)
    trainable = [p for m in owners.values() for p in m.parameters() if p.requires_grad]
    copies = [p for sp in info.modules_to_save for p in att.wrappers[sp].adapters[name].parameters()]
    with all_or_nothing(model):
        for path, layer in layers.items():
            att.wrappers[path].adapters[name] = layer.train(bases[path].training)
        if shared is not None:
            att.wrappers[info.targets[0]].shared[name] = shared.train(bases[info.targets[0]].training)
        elif name in att.wrappers[info.targets[0]].shared:
            del att.wrappers[info.targets[0]].shared[name]
        info.method = method
        info.configs = configs
        info.shared = shared
        info.trainable = list({id(p): p for p in [*trainable, *copies]}.values())
        for p in info.trainable:
            p.requires_grad_(name in att.active)
    return att


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def combine(model: nn.Module, weights: Mapping[str, float], name: str) -> Attachment:
    """Add adapter ``name`` equal to ``sum_i weights[i] * adapter_i``, exactly.

    For LoRA this concatenates the factors (rank = sum of ranks), so the combined update is exact,
    not an SVD approximation.
    """
    att = attachment_of(model)
    if not weights:
        raise ValueError("combine: weights must name at least one adapter")
    infos = [att.info(n) for n in weights]
    kinds = {type(i.method) for i in infos}
    if len(kinds) != 1:
        raise ValueError(f"combine: adapters must use one method, got {sorted(k.__name__ for k in kinds)}")
    cls = kinds.pop()
    if not cls.combinable:
        raise ValueError(f"combine: {cls.__name__} adapters cannot be combined exactly")
    if any(i.modules_to_save for i in infos):
        raise ValueError("combine: adapters with modules_to_save cannot be combined (their copies differ)")
    if name in att.adapters:
        raise ValueError(f"adapter {name!r} already exists on this model")
    check_adapter_name(name)
    bad = {n: w for n, w in weights.items() if not _finite_number(w)}
    if bad:
        raise ValueError(f"combine: weights must be finite numbers, got {bad}")
    paths = [p for p in att.wrappers if any(p in i.targets for i in infos)]
    configs: dict[str, Any] = {}
    layers: dict[str, nn.Module] = {}
    for path in paths:
        parts = [
            (att.wrappers[path].adapters[i.name], float(weights[i.name]))
            for i in infos
            if i.name in att.wrappers[path].adapters
        ]
        configs[path], layers[path] = cls.combine_layers(parts)
    method = configs[paths[0]]
    overrides = {
        p: {
            f.name: getattr(c, f.name)
            for f in dataclasses.fields(c)
            if getattr(method, f.name) != getattr(c, f.name)
        }
        for p, c in configs.items()
        if c != method
    }
    trainable = [p for layer in layers.values() for p in layer.parameters()]
    for p in trainable:
        p.requires_grad_(False)
    with all_or_nothing(model):
        for path, layer in layers.items():
            att.wrappers[path].adapters[name] = layer
        att.adapters[name] = AdapterInfo(
            name=name,
            method=method,
            targets=tuple(paths),
            overrides=overrides,
            modules_to_save=(),
            seed=infos[0].seed,
            configs=configs,
            trainable=trainable,
        )
    return att
