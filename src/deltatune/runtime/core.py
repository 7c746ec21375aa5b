"""The lifecycle verbs: inject, merge, unload, disabled, route, set_active, ...

What a method must provide is in :mod:`deltatune.contract` (read it first); the wrapper that every
adapted module becomes, and the attachment that tracks a model's adapters, are in
:mod:`deltatune.runtime.wrapper`. This module owns the verbs; the verbs that make adapters out of adapters
(``combine``, ``reconfigure``) are in :mod:`deltatune.runtime.compose`.

Every verb is all-or-nothing: it makes all its checks before the first change, and a verb that
changes the model in several steps runs them inside :func:`all_or_nothing`, so that a verb that
raises leaves the modules, the active adapters and every ``requires_grad`` flag as they were.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deltatune import LoRA, inject, merge
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> att = inject(net, LoRA(rank=2), targets=["0"])
    >>> [p.shape for p in trainable_parameters(net)]
    [torch.Size([2, 8]), torch.Size([8, 2])]
    >>> merged = merge(net)
    >>> type(merged[0]).__name__
    'Linear'
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import targets as _targets
from ..contract import Method, config_for, float_weight_reason, hooks
from ..kernels.lowrank import check_precision
from .merged import merged_module
from .routing import Routing
from .wrapper import (
    ATTACHMENT_ATTR,
    Adapted,
    AdapterInfo,
    Attachment,
    ModuleCopy,
    all_or_nothing,
    attachment_of,
    base_modules,
    has_adapters,
    set_submodule,
)

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def check_adapter_name(name: object) -> None:
    """Refuse an adapter name that is not letters, digits, '_' or '-' (it becomes a module key)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"adapter name must be letters, digits, '_' or '-', got {name!r}")


def _seed_for(seed: int, path: str) -> int:
    # A stable per-module seed: the same (seed, path) always gives the same init, across processes.
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63)


def _generator(seed: int, path: str) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_seed_for(seed, path))
    return gen


def _check_overrides(
    method: Method, overrides: Mapping[str, Mapping[str, Any]], paths: Sequence[str]
) -> None:
    known = {f.name for f in dataclasses.fields(method)}
    for pattern, values in overrides.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"overrides[{pattern!r}] must be a mapping of field -> value, got {values!r}")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"overrides[{pattern!r}]: {type(method).__name__} has no field(s) {unknown}; "
                f"fields: {sorted(known)}"
            )
        if not any(_targets.pattern_matches(p, pattern) for p in paths):
            raise ValueError(
                f"overrides[{pattern!r}] matches none of the targeted modules: {list(paths)[:8]}"
            )


def inject(
    model: nn.Module,
    method: Method,
    targets: _targets.TargetSpec | None = None,
    *,
    name: str = "default",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    modules_to_save: Sequence[str] = (),
    seed: int = 0,
    activate: bool = True,
) -> Attachment:
    """Add adapter ``name`` of ``method`` to the modules that ``targets`` selects.

    Everything but the adapter is frozen. Calling it again with another ``name`` adds a second
    adapter to the same model.

    Args:
        model: any ``nn.Module``; it is modified in place.
        method: a registered method config, e.g. ``LoRA(rank=8)``.
        targets: which modules to adapt (see :mod:`deltatune.targets`); default: the method's
            placement, else ``"all-linear"`` (:func:`deltatune.targets.default_targets`).
        name: the adapter's name (a Python-identifier-like string).
        overrides: per-module field values by name/suffix/regex, e.g. ``{"value": {"rank": 16}}``.
        modules_to_save: modules trained in full and stored with the adapter (e.g. a head).
        seed: seeds the adapter's initialisation; the global RNG is never touched.
        activate: make the new adapter the active one (and the trainable one).

    Returns:
        The model's :class:`Attachment`.

    Raises:
        ValueError: unregistered method, bad target, unsupported module type, name in use, ...
    """
    plan = _plan(model, method, targets, name, overrides, modules_to_save, seed)
    shared, layers = build_layers(method, plan.configs, plan.bases, seed)
    copies = {sp: _to_device_of(ModuleCopy(plan.modules[sp]), plan.modules[sp]) for sp in plan.save_paths}
    # Nothing has been modified so far: every check can fail without leaving a trace, and should a
    # step of attaching fail, all_or_nothing puts the model back as it was.
    with all_or_nothing(model):
        _attach(model, plan, method, name, shared, layers, copies, seed=seed, activate=activate)
    return plan.att


@dataclass
class _Plan:
    """What :func:`inject` checked and will change: the attachment (``created`` if new), the
    adapted ``paths`` with their ``bases`` and per-path ``configs``, the modules to save, the
    overrides, and the model's modules as seen through existing wrappers."""

    att: Attachment
    created: bool
    paths: list[str]
    save_paths: list[str]
    modules: dict[str, nn.Module]
    configs: dict[str, Method]
    overrides: dict[str, dict[str, Any]]

    @property
    def bases(self) -> dict[str, nn.Module]:
        return {p: self.modules[p] for p in self.paths}


def _plan(
    model: nn.Module,
    method: Method,
    targets: _targets.TargetSpec | None,
    name: str,
    overrides: Mapping[str, Mapping[str, Any]] | None,
    modules_to_save: Sequence[str],
    seed: int,
) -> _Plan:
    """:func:`inject`'s checks, all before any change: the method, the name, the seed, the targets
    (kinds the method adapts, no 4-bit weight for a method that needs the float one), the modules to
    save (not overlapping the targets), the method's own target check and the overrides."""
    spec = hooks(method)  # refuses an unregistered method; every optional hook, own or default
    check_adapter_name(name)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    created = not has_adapters(model)
    att = Attachment(model) if created else attachment_of(model)
    if name in att.adapters:
        raise ValueError(
            f"adapter {name!r} already exists on this model; pass another name= to add a second "
            "adapter, or delete_adapter() it first"
        )
    override_map = {k: dict(v) for k, v in (overrides or {}).items()}
    modules = base_modules(model, att)
    if targets is None:
        targets = _targets.default_targets(spec, model)
    paths, expert_selection = _targets.resolve_targets(model, targets, modules)
    save_paths = _targets.resolve(model, list(modules_to_save), modules) if modules_to_save else []
    save_paths = [p for p in save_paths if not any(p.startswith(q + ".") for q in save_paths)]
    cls = type(method).__name__
    for path in paths:
        if _targets.module_kind(modules[path]) not in method.layer_types:
            raise ValueError(
                f"{cls}: {path!r} is {type(modules[path]).__name__}; "
                f"{cls} adapts {', '.join(method.layer_types)} modules only"
            )
        if getattr(modules[path], "quantized", False) and not spec.quantized_base:
            raise ValueError(
                f"{cls}: {path!r} has a quantised weight ({type(modules[path]).__name__}); "
                f"{float_weight_reason(method)}: use LoRA (QLoRA) on a quantised base, or {cls} on the "
                "float model"
            )
    for sp in save_paths:
        clash = [p for p in paths if p == sp or p.startswith(sp + ".") or sp.startswith(p + ".")]
        if clash:
            raise ValueError(f"modules_to_save {sp!r} overlaps the targeted module(s) {clash[:4]}")
    _select_expert_weights(method, expert_selection, override_map)
    spec.check_targets(model, paths)
    _check_overrides(method, override_map, paths)
    configs = {p: config_for(method, p, override_map) for p in paths}
    return _Plan(att, created, paths, save_paths, modules, configs, override_map)


def _select_expert_weights(
    method: Method, selection: Mapping[str, tuple[str, ...]], override_map: dict[str, dict[str, Any]]
) -> None:
    """Targets that name weights of fused experts (``"experts.down_proj"``) adapt those weights
    only: an exact-path override of the method's ``expert_weights`` (saved with the adapter, so a
    load rebuilds the same layers)."""
    if not selection:
        return
    if "expert_weights" not in {f.name for f in dataclasses.fields(method)}:
        path, names = next(iter(selection.items()))
        raise ValueError(
            f"{type(method).__name__} adapts fused experts as a whole module; the targets name only "
            f"their weight(s) {list(names)} of {path!r}: target the module ({path.split('.')[-1]!r}) "
            "instead, or use LoRA, which adapts single expert weights"
        )
    for path, names in selection.items():
        key = "^" + re.escape(path) + "$"
        override_map[key] = {**override_map.get(key, {}), "expert_weights": names}


def _attach(
    model: nn.Module,
    plan: _Plan,
    method: Method,
    name: str,
    shared: nn.Module | None,
    layers: Mapping[str, nn.Module],
    copies: Mapping[str, nn.Module],
    *,
    seed: int,
    activate: bool,
) -> None:
    """:func:`inject`'s changes: freeze the model (first adapter), wrap each path (or reuse its
    wrapper), hang the new layers and copies on the wrappers, record the adapter, activate it."""
    att, modules = plan.att, plan.modules
    if plan.created:
        for p in model.parameters():
            p.requires_grad_(False)
        model.__dict__[ATTACHMENT_ATTR] = att
    # New modules take the training mode of the module they adapt: an adapter injected into (or
    # loaded onto) a model in eval mode must not run its dropout.
    for path, layer in {**layers, **copies}.items():
        wrapper = att.wrappers.get(path)
        if wrapper is None:
            wrapper = Adapted(modules[path], att.switch).train(modules[path].training)
            set_submodule(model, path, wrapper)
            att.wrappers[path] = wrapper
        wrapper.adapters[name] = layer.train(modules[path].training)
    if shared is not None:
        att.wrappers[plan.paths[0]].shared[name] = shared.train(modules[plan.paths[0]].training)
    held = [*layers.values(), *copies.values(), *([shared] if shared is not None else [])]
    trainable = list({id(p): p for m in held for p in m.parameters() if p.requires_grad}.values())
    att.adapters[name] = AdapterInfo(
        name=name,
        method=method,
        targets=tuple(plan.paths),
        overrides=plan.overrides,
        modules_to_save=tuple(plan.save_paths),
        seed=seed,
        configs=plan.configs,
        trainable=trainable,
        shared=shared,
    )
    if activate:
        att.set_active(name)
    else:
        for p in trainable:
            p.requires_grad_(False)


def build_layers(
    method: Method, configs: Mapping[str, Method], bases: Mapping[str, nn.Module], seed: int
) -> tuple[nn.Module | None, dict[str, nn.Module]]:
    """An adapter's new modules, nothing attached yet: its shared state (None for most methods) and
    one layer per path (``configs[path].wrap``), each seeded by (``seed``, path) and on the device of
    the module it serves (the shared state before the layers see it). :func:`inject` and
    :func:`deltatune.runtime.compose.reconfigure` build through it."""
    shared = hooks(method).make_shared(bases, _generator(seed, "<shared>"))
    if shared is not None:
        shared = _to_device_of(shared, *bases.values())
    layers = {
        path: _to_device_of(
            configs[path].wrap(base, shared, path=path, generator=_generator(seed, path)), base
        )
        for path, base in bases.items()
    }
    return shared, layers


def _to_device_of(layer: nn.Module, *bases: nn.Module) -> nn.Module:
    """``layer`` (or an adapter's shared state) moved to the device of the first of ``bases`` that
    has parameters: a GPU, or ``meta`` for a weightless model; left where it is if none has any."""
    ref = next((p for base in bases for p in base.parameters()), None)
    if ref is not None:
        layer.to(device=ref.device)
    return layer


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Switch which adapter(s) run and train.

    Model-wide: every thread and task using ``model`` sees the change at once. To serve different
    adapters to concurrent requests, use :func:`route` (per request), not ``set_active``."""
    attachment_of(model).set_active(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; wrappers left empty give their base module back."""
    att = attachment_of(model)
    info = att.info(name)
    with all_or_nothing(model):
        for path in [*info.targets, *info.modules_to_save]:
            wrapper = att.wrappers[path]
            del wrapper.adapters[name]
            if name in wrapper.shared:
                del wrapper.shared[name]
            if len(wrapper.adapters) == 0:
                set_submodule(model, path, wrapper.base)
                del att.wrappers[path]
        del att.adapters[name]
        att.switch.active = tuple(n for n in att.switch.active if n != name)
        if not att.adapters:
            _detach(model, att)


def _detach(model: nn.Module, att: Attachment) -> None:
    att.restore_flags()
    del model.__dict__[ATTACHMENT_ATTR]


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and put the original modules back (the same objects)."""
    att = attachment_of(model)
    with all_or_nothing(model):
        for path, wrapper in att.wrappers.items():
            set_submodule(model, path, wrapper.base)
        _detach(model, att)
    return model


def merge(
    model: nn.Module, adapters: str | Sequence[str] | None = None, *, dequantize: bool = False
) -> nn.Module:
    """Fold adapter(s) into the weights and remove every wrapper; other adapters are dropped.

    Args:
        adapters: which adapters to fold in; default: the active ones.
        dequantize: merge into quantised (4-bit) bases by dequantising them to float first;
            without it such a base is an error.

    Returns:
        The model (modified in place), now free of deltatune modules.

    Raises:
        ValueError: if the model has no adapters (e.g. already merged) or a method is not mergeable.
    """
    att = attachment_of(model)
    names = (
        att.active if adapters is None else ((adapters,) if isinstance(adapters, str) else tuple(adapters))
    )
    if not names:
        raise ValueError("merge: no adapter is active; pass adapters=... to choose which to merge")
    for n in names:
        info = att.info(n)
        if not type(info.method).mergeable:
            raise ValueError(
                f"{type(info.method).__name__} (adapter {n!r}) is not mergeable: its computation "
                "cannot be folded into the weights; use unload() or keep the adapter attached"
            )
    # Every merged module is built before the first one is put in place.
    replacements: dict[str, nn.Module] = {}
    for path, wrapper in att.wrappers.items():
        module = wrapper.base
        for n in names:
            if n in wrapper.adapters:
                module = merged_module(wrapper.adapters[n], module, path, dequantize)
        replacements[path] = module
    with all_or_nothing(model):
        for path, module in replacements.items():
            set_submodule(model, path, module)
        _detach(model, att)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside the block every adapter is off; the previous state returns on exit.

    The block is the caller's alone: other threads and asyncio tasks running the same model meanwhile
    keep their adapters (the state is context-local, see :class:`deltatune.runtime.wrapper.Switch`)."""
    with attachment_of(model).switch.scoped(enabled=False):
        yield model


@contextlib.contextmanager
def route(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Per-example adapters in one batch: example ``i`` uses adapter ``names[i]`` (None: the base).

    Each example gets what it would get alone. Where two or more low-rank adapters (update ``s · B A
    x``: LoRA, PiSSA, VB-LoRA, Tied-LoRA, ...) meet on one module, every row's factors are gathered
    (ranks zero-padded) and two batched products serve them all, with no copy of the activations;
    other methods, and under autograd batches with fewer tokens per example than the rank, gather
    each adapter's rows instead. The row table is built once per block and device; when serving (no
    autograd) the stacked factors are kept until the block ends, while unchanged, so a generation loop
    inside one block stacks them once.

    Thread- and task-safe: the plan is context-local (:class:`contextvars.ContextVar`), so threads or
    asyncio tasks serving one model at once each get their own rows, whatever the others route.
    Forwards run in a thread started inside the block do not see it (run them through
    ``contextvars.copy_context().run`` or ``asyncio.to_thread``, which carry it; ``nn.DataParallel``'s
    replica threads do not: use DDP)."""
    att = attachment_of(model)
    for n in dict.fromkeys(names):
        if n is None:
            continue
        info = att.info(n)
        if not type(info.method).supports_mixed_batch:
            raise ValueError(f"{type(info.method).__name__} (adapter {n!r}) does not support route()")
        if info.modules_to_save:
            raise ValueError(f"route(): adapter {n!r} has modules_to_save, which cannot be mixed per example")
    with att.switch.scoped(routing=Routing(names)):
        yield model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train: those of the active adapters (selected structurally)."""
    att = attachment_of(model)
    out: dict[int, nn.Parameter] = {}
    for n in att.active:
        for p in att.adapters[n].trainable:
            if p.requires_grad:
                out[id(p)] = p
    return list(out.values())


def set_adapter_precision(model: nn.Module, mode: str) -> None:
    """Set the dtype ``model``'s adapters compute in: ``"input"`` (default: the input's dtype, the
    small factors cast) or ``"adapter"`` (the adapters' own float32, the input widened inside the
    low-rank product). A property of this model (copies keep it); a
    :func:`deltatune.adapter_precision_as` block overrides it for the thread or task that opens it."""
    if not has_adapters(model):
        raise ValueError("set_adapter_precision: the model has no adapters (inject one first)")
    attachment_of(model).switch.precision = check_precision(mode)
