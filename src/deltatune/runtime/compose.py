"""Adapters made from adapters: ``reconfigure`` (an adapter re-created with another configuration
of its method, keeping every tensor that still fits: a continual adapter grown by one task) and
``attach_combined`` (the attachment of an adapter that :func:`deltatune.combine` computed).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..contract import SHARED_ATTR, Method, config_for, export_state, import_state, module_tensors
from .core import build_layers, check_adapter_name
from .state import adapter_state
from .wrapper import AdapterInfo, Attachment, all_or_nothing, attachment_of

__all__ = ["attach_combined", "reconfigure"]


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


def attach_combined(
    model: nn.Module,
    name: str,
    configs: Mapping[str, Any],
    layers: Mapping[str, nn.Module],
    *,
    seed: int,
    copies_of: str | None = None,
) -> Attachment:
    """Add adapter ``name`` made of ready ``layers`` (path -> layer, their per-module ``configs``):
    frozen, all or nothing, with adapter ``copies_of``'s full module copies (``modules_to_save``:
    a classifier head) copied along. What :func:`deltatune.combine` builds."""
    att = attachment_of(model)
    if name in att.adapters:
        raise ValueError(f"adapter {name!r} already exists on this model")
    check_adapter_name(name)
    paths = list(layers)
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
    saved = att.info(copies_of).modules_to_save if copies_of is not None else ()
    copies = {p: copy.deepcopy(att.wrappers[p].adapters[copies_of]) for p in saved if copies_of is not None}
    trainable = [p for layer in [*layers.values(), *copies.values()] for p in layer.parameters()]
    for p in trainable:
        p.requires_grad_(False)
    with all_or_nothing(model):
        for path, layer in [*layers.items(), *copies.items()]:
            att.wrappers[path].adapters[name] = layer
        att.adapters[name] = AdapterInfo(
            name=name,
            method=method,
            targets=tuple(paths),
            overrides=overrides,
            modules_to_save=saved,
            seed=seed,
            configs=dict(configs),
            trainable=trainable,
        )
    return att
