"""The wrapper every adapted module becomes, and the attachment that tracks a model's adapters.

Every adapted module is replaced by one :class:`Adapted` wrapper that keeps the original module as
``wrapper.base``, untouched, plus one small layer per named adapter in ``wrapper.adapters``. So
several adapters can live on one model, ``unload`` puts the very same base modules back, and
``merge`` puts back a plain module whose weight is ``base.weight + delta_weight()``. The
:class:`Attachment` (``attachment_of(model)``) records every adapter (:class:`AdapterInfo`), its
wrappers and which adapters are active.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..contract import (
    ExpertsLayer,
    Method,
    ReplacingLayer,
    Wrapped,
    closed_form,
    lowrank_factors,
    reads_output,
)
from ..kernels.lowrank import compute_dtype, fusable, lowrank_linear, model_precision
from .experts import routed_experts, stacked_experts
from .routing import Routing, add_batched, batched_factors

ATTACHMENT_ATTR = "_deltatune_attachment"


class Switch:
    """State shared by every wrapper of one model: which adapters run, and how.

    ``active`` belongs to the model (:func:`deltatune.set_active`: every thread and task sees the
    change). ``enabled`` (:func:`deltatune.disabled`) and ``routing`` (:func:`deltatune.route`) belong
    to the block that set them: they live in a :class:`contextvars.ContextVar`, so concurrent threads
    and asyncio tasks serving one model each see their own blocks, never another request's. A thread
    started inside a block does not see it (threads start with an empty context) unless it runs in a
    copy of it (``contextvars.copy_context().run``; ``asyncio.to_thread`` copies it)."""

    def __init__(self, active: tuple[str, ...] = (), precision: str = "input") -> None:
        self.active = active
        self.precision = precision  # the model's adapter compute policy (lowrank.PRECISIONS)
        # (enabled, routing) of the innermost disabled()/route() block of this context
        self._local: ContextVar[tuple[bool, Routing | None]] = ContextVar(
            "deltatune_switch", default=(True, None)
        )
        # Whether any thread or task has a block open: while none has, forwards skip the ContextVar
        # (torch.compile cannot trace ContextVar.get; a compiled forward outside blocks sees a bool).
        self.scoped_open = False
        self._open = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.state()[0]

    @property
    def routing(self) -> Routing | None:
        return self.state()[1]

    def state(self) -> tuple[bool, Routing | None]:
        """(enabled, routing) as this context sees them: one lookup per forward."""
        return self._local.get() if self.scoped_open else (True, None)

    @contextlib.contextmanager
    def scoped(self, *, enabled: bool | None = None, routing: Routing | None = None) -> Iterator[None]:
        """Within the block, and only in this context: adapters off (``enabled=False``) or routed per
        example (``routing``); the state before returns on exit."""
        self._count(+1)  # (before the state is set: a forward in the block always reads it)
        try:
            now_enabled, now_routing = self._local.get()
            token = self._local.set(
                (now_enabled if enabled is None else enabled, now_routing if routing is None else routing)
            )
            try:
                yield
            finally:
                self._local.reset(token)
        finally:
            self._count(-1)

    def _count(self, step: int) -> None:
        with self._lock:
            self._open += step
            self.scoped_open = self._open > 0

    def __deepcopy__(self, memo: dict[int, Any]) -> Switch:
        # A copied model gets a switch of its own (its own blocks), with the same active adapters.
        return Switch(self.active, self.precision)

    def __getstate__(self) -> dict[str, Any]:  # (a ContextVar does not pickle: only the model's state)
        return {"active": self.active, "precision": self.precision}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(tuple(state["active"]), state.get("precision", "input"))  # type: ignore[misc]


class ModuleCopy(ReplacingLayer):
    """A trainable full copy of a module (``modules_to_save``): it replaces the base when active."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(base)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def merged(self, base: nn.Module) -> nn.Module:
        out = copy.deepcopy(self.module)
        for p in out.parameters():
            p.requires_grad_(False)
        return out


def _delta_source(layer: nn.Module, x: Any, base_out: Any) -> Any:
    """What an additive layer's ``delta`` reads: the module's first input, or the base module's
    output for a layer that ``reads = "output"`` (e.g. a bottleneck adapter placed after a
    projection: ``y = f(x) + delta(f(x))``)."""
    return base_out if reads_output(layer) else x


class Adapted(Wrapped):
    """Holds an original module (``base``, untouched) and one layer per named adapter."""

    def __init__(self, base: nn.Module, switch: Switch) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        # State shared by all layers of an adapter (e.g. VB-LoRA's bank) lives in the wrapper of the
        # adapter's first target: inside the module tree (so .to() and .parameters() see it once),
        # never as a new child of the user's model (an nn.Sequential would call it).
        self.shared = nn.ModuleDict()
        self._switch = switch

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._switch.precision != "input":  # the model's own policy (deltatune.set_adapter_precision)
            with model_precision(self._switch.precision):
                return self._forward(*args, **kwargs)
        return self._forward(*args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        switch = self._switch
        enabled, routing = switch.state()
        if not enabled:
            return self.base(*args, **kwargs)
        if routing is not None:
            return self._routed(routing, *args, **kwargs)
        names = [n for n in switch.active if n in self.adapters]
        if not names:
            return self.base(*args, **kwargs)
        layers: list[Any] = [self.adapters[n] for n in names]
        if all(isinstance(layer, ExpertsLayer) for layer in layers):
            return stacked_experts(self.base, layers, args, kwargs)  # (their updates add up)
        replacing = [layer for layer in layers if not layer.additive]
        if replacing:
            # set_active() guarantees a replacing layer is alone on its module.
            return replacing[0](self.base, *args, **kwargs)
        if len(layers) == 1 and len(args) == 1 and not kwargs and fusable(self.base, args[0]):
            # A lone low-rank update on a plain frozen Linear: one fused kernel (see lowrank.py), in
            # the input's dtype under the default precision policy (the factors cast, not x).
            parts = lowrank_factors(layers[0])
            if parts is not None:
                A, B, scale = parts
                x = args[0]
                if compute_dtype(x, A) == x.dtype:
                    return lowrank_linear(self.base, x, A.to(x.dtype), B.to(x.dtype), scale)  # type: ignore[arg-type]
        out = self.base(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        base_out = out
        for layer in layers:
            out = out + layer.delta(_delta_source(layer, x, base_out)).to(out.dtype)
        return out

    def _routed(self, routing: Routing, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(layer, ExpertsLayer) for layer in self.adapters.values()):
            return routed_experts(self.base, self.adapters, routing, args, kwargs)
        out = self.base(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        if x.shape[0] != len(routing):
            raise ValueError(
                f"route(): {len(routing)} adapter names given for a batch of {x.shape[0]} examples"
            )
        here = [name for name in routing.rows if name in self.adapters]
        # Serving (no autograd): add each adapter's rows into the base output in place, instead of
        # copying the whole output once per adapter; only into a fresh tensor (not the input, not a
        # view) that no layer reads as its input.
        in_place = (
            not torch.is_grad_enabled()
            and out is not x
            and out._base is None
            and not any(reads_output(self.adapters[n]) for n in here)
        )
        batched = batched_factors(routing, {n: self.adapters[n] for n in here}, x)
        if batched is not None:
            out = add_batched(out, x, routing, batched, in_place, self)
            here = [n for n in here if n not in batched]
        base_out = out
        for name in here:
            layer: Any = self.adapters[name]
            source = _delta_source(layer, x, base_out)
            if routing.covers_all(name):
                delta = layer.delta(source).to(out.dtype)
                out = out.add_(delta) if in_place else out + delta
                continue
            rows = routing.indices(name, x.device)
            delta = layer.delta(source.index_select(0, rows)).to(out.dtype)
            out = out.index_add_(0, rows, delta) if in_place else out.index_add(0, rows, delta)
        return out

    def __getattr__(self, name: str) -> Any:
        # Model code often reads attributes of the module it calls (``self.wo.weight.dtype`` in T5,
        # ``in_features``, GPT-2's ``nf``): answer those from the base, so wrapping changes nothing.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "adapters", "shared") or "base" not in self._modules:
                raise
            return getattr(self._modules["base"], name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


@dataclass
class AdapterInfo:
    """Everything needed to recreate one named adapter (and to save it)."""

    name: str
    method: Method
    targets: tuple[str, ...]
    overrides: dict[str, dict[str, Any]]
    modules_to_save: tuple[str, ...]
    seed: int
    configs: dict[str, Method] = field(default_factory=dict)  # path -> per-module method config
    trainable: list[nn.Parameter] = field(default_factory=list)
    shared: nn.Module | None = None


class Attachment:
    """The handle :func:`inject` returns; also reachable as ``attachment_of(model)``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.switch = Switch()
        self.adapters: dict[str, AdapterInfo] = {}
        self.wrappers: dict[str, Adapted] = {}
        # The flags unload restores, by parameter. Weak references: a parameter the model drops (a
        # weight quantize() replaced by its 4-bit copy) is freed, not kept alive for its flag.
        self.requires_grad: dict[int, tuple[weakref.ref[nn.Parameter], bool]] = {
            id(p): (weakref.ref(p), p.requires_grad) for p in model.parameters()
        }

    # -- queries ------------------------------------------------------------------------------
    @property
    def active(self) -> tuple[str, ...]:
        return self.switch.active

    def shared(self, name: str) -> nn.Module | None:
        """The state shared by every layer of adapter ``name`` (None for most methods)."""
        return self.info(name).shared

    def info(self, name: str) -> AdapterInfo:
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; this model has {sorted(self.adapters)}")
        return self.adapters[name]

    def layers(self, name: str) -> dict[str, nn.Module]:
        """path -> the adapter's layer (or module copy) at that path."""
        self.info(name)
        return {p: w.adapters[name] for p, w in self.wrappers.items() if name in w.adapters}

    def adapter_layers(self, name: str) -> dict[str, nn.Module]:
        """path -> the method's layer at each target of adapter ``name`` (the full copies of its
        ``modules_to_save`` apart): what a method's between-step hooks act on."""
        targets = self.info(name).targets
        return {p: self.wrappers[p].adapters[name] for p in targets if name in self.wrappers[p].adapters}

    def set_module_fields(self, name: str, path: str, fields: Mapping[str, Any]) -> None:
        """Record that the module at ``path`` of adapter ``name`` now has these method fields (a
        structure its training chose: AdaLoRA's kept rank, LoRA-drop's dropped module), as an
        exact-path override: a save writes it, and a load re-creates the module that way. A field set
        to its adapter-wide value drops out of the override."""
        info = self.info(name)
        if path not in info.targets:
            raise ValueError(f"set_module_fields: {path!r} is not a target of adapter {name!r}")
        config = dataclasses.replace(info.configs[path], **fields)
        base = dataclasses.asdict(info.method)
        key = "^" + re.escape(path) + "$"
        entry = {**info.overrides.get(key, {}), **fields}
        entry = {k: v for k, v in entry.items() if v != base.get(k)}
        overrides = {k: v for k, v in info.overrides.items() if k != key}
        if entry:
            overrides[key] = entry
        info.overrides = overrides
        info.configs[path] = config

    def freeze(self, name: str, params: Sequence[nn.Parameter]) -> None:
        """Stop training ``params`` of adapter ``name`` (a part its training retired): no gradient,
        and no longer among its trainable parameters."""
        ids = {id(p) for p in params}
        info = self.info(name)
        for p in params:
            p.requires_grad_(False)
        info.trainable = [p for p in info.trainable if id(p) not in ids]

    def replace_parameters(self, mapping: Mapping[int, nn.Parameter]) -> None:
        """After a wrapper replaced the model's parameters by new objects (FSDP2's ``fully_shard``
        turns them into sharded ``DTensor``s), point every adapter's trainable parameters, and the
        flags ``unload`` restores, at the new ones: ``mapping`` is ``id(old) -> new``."""
        for info in self.adapters.values():
            info.trainable = [mapping.get(id(p), p) for p in info.trainable]
        moved = [
            (mapping[pid] if pid in mapping else ref(), flag)
            for pid, (ref, flag) in self.requires_grad.items()
        ]
        self.requires_grad = {id(p): (weakref.ref(p), flag) for p, flag in moved if p is not None}

    def restore_flags(self) -> None:
        """Give every parameter of the model that is still there the ``requires_grad`` it had before
        the first inject."""
        for ref, flag in self.requires_grad.values():
            p = ref()
            if p is not None:
                p.requires_grad_(flag)

    def closed_form(self, name: str) -> tuple[int, int]:
        """(trainable parameters, stored bytes) of adapter ``name`` from the methods' formulas."""
        info = self.info(name)
        bases = {p: self.wrappers[p].base for p in info.targets}
        saved = {p: self.wrappers[p].base for p in info.modules_to_save}
        return closed_form(info.method, bases, info.overrides, saved)

    # -- switching ----------------------------------------------------------------------------
    def set_active(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the adapters that run (and train); the others stay in memory, frozen.
        Model-wide (every thread and task sees it); per-request choices go through ``route``."""
        names = (names,) if isinstance(names, str) else tuple(names)
        for n in names:
            self.info(n)
        if len(set(names)) != len(names):
            raise ValueError(f"set_active: adapter names repeat: {list(names)}")
        if len(names) > 1:
            for path, wrapper in self.wrappers.items():
                here = [n for n in names if n in wrapper.adapters]
                stacking = all(isinstance(wrapper.adapters[n], ExpertsLayer) for n in here)
                if len(here) > 1 and not stacking and any(not wrapper.adapters[n].additive for n in here):
                    raise ValueError(
                        f"set_active: adapters {here} cannot run together on {path!r}: "
                        "one of them replaces the module instead of adding to it"
                    )
        self.switch.active = names
        for info in self.adapters.values():
            for p in info.trainable:
                p.requires_grad_(info.name in names)


def attachment_of(model: nn.Module) -> Attachment:
    """The :class:`Attachment` of a model that has adapters; ``ValueError`` if it has none."""
    att = model.__dict__.get(ATTACHMENT_ATTR)
    if not isinstance(att, Attachment):
        raise ValueError(
            f"{type(model).__name__} has no deltatune adapters; call deltatune.inject(model, ...) first"
        )
    return att


def has_adapters(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get(ATTACHMENT_ATTR), Attachment)


def base_modules(model: nn.Module, att: Attachment | None) -> dict[str, nn.Module]:
    """path -> module, seeing through our wrappers (a wrapper shows as its base)."""
    out: dict[str, nn.Module] = {}
    skip: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(s) for s in skip):
            continue
        if isinstance(module, Adapted):
            if att is None or att.wrappers.get(path) is not module:
                raise ValueError(
                    f"{path!r} is already wrapped by another deltatune attachment; "
                    "inject into the model you injected first"
                )
            out[path] = module.base
            skip.append(path + ".")
            continue
        out[path] = module
    return out


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


# -- all or nothing: what a verb that fails part-way puts back ----------------------------------


@dataclass
class _Snapshot:
    """What a verb may change on a model, by reference (no tensor is copied): each module's children,
    parameters, buffers and training mode, each parameter's ``requires_grad``, and the attachment
    (its switch, adapters, wrappers and each adapter's record)."""

    attachment: Attachment | None
    modules: list[tuple[nn.Module, list[tuple[dict[str, Any], dict[str, Any]]], bool]]
    flags: list[tuple[nn.Parameter, bool]]
    active: tuple[str, ...]
    adapters: dict[str, AdapterInfo]
    records: dict[str, dict[str, Any]]
    wrappers: dict[str, Adapted]
    requires_grad: dict[int, tuple[weakref.ref[nn.Parameter], bool]]


def _snapshot(model: nn.Module) -> _Snapshot:
    att = model.__dict__.get(ATTACHMENT_ATTR)
    att = att if isinstance(att, Attachment) else None
    # (each module's dicts of children, parameters and buffers: the dict itself and its contents)
    modules = [
        (m, [(d, dict(d)) for d in (m._modules, m._parameters, m._buffers)], m.training)
        for m in model.modules()
    ]
    flags = [(p, p.requires_grad) for m in model.modules() for p in m._parameters.values() if p is not None]
    records = {
        n: {k: (v.copy() if isinstance(v, dict | list) else v) for k, v in vars(info).items()}
        for n, info in (att.adapters.items() if att is not None else ())
    }
    switch = att.switch if att is not None else Switch()  # (enabled, routing: the blocks', not a verb's)
    return _Snapshot(
        attachment=att,
        modules=modules,
        flags=flags,
        active=switch.active,
        adapters=dict(att.adapters) if att is not None else {},
        records=records,
        wrappers=dict(att.wrappers) if att is not None else {},
        requires_grad=dict(att.requires_grad) if att is not None else {},
    )


def _restore(model: nn.Module, saved: _Snapshot) -> None:
    for module, dicts, training in saved.modules:
        for attr, (held, contents) in zip(("_modules", "_parameters", "_buffers"), dicts, strict=True):
            held.clear()
            held.update(contents)
            module.__dict__[attr] = held
        module.training = training
    for p, flag in saved.flags:
        if p.requires_grad != flag:
            p.requires_grad_(flag)
    att = saved.attachment
    if att is None:
        model.__dict__.pop(ATTACHMENT_ATTR, None)
        return
    model.__dict__[ATTACHMENT_ATTR] = att
    # The switch is shared by every wrapper: restored in place, as are the attachment's dicts.
    att.switch.active = saved.active
    att.adapters.clear()
    att.adapters.update(saved.adapters)
    for n, record in saved.records.items():
        vars(saved.adapters[n]).update(record)
    att.wrappers.clear()
    att.wrappers.update(saved.wrappers)
    att.requires_grad.clear()
    att.requires_grad.update(saved.requires_grad)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[nn.Module]:
    """Run a verb's steps as one: if the block raises, the model's modules, parameters, buffers,
    training modes, ``requires_grad`` flags and adapters (which exist, which are active) are put
    back as they were on entry, and the exception propagates.

    Nothing is copied (references only), so it is cheap; but a tensor changed *in place* is not
    undone: a verb does its in-place writes last, after every step that can fail.
    """
    saved = _snapshot(model)
    try:
        yield model
    except BaseException:
        _restore(model, saved)
        raise
