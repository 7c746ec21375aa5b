"""The method contract: what a method and its layers provide. Read this module first.

A *method* (LoRA, VB-LoRA, prefix tuning, ...) is a frozen, keyword-only dataclass registered with
:func:`register`; it says *what* to add, :func:`deltatune.inject` says *where*. Its capabilities are
class data (:data:`CAPABILITIES` and the flags below), which the core and the tests read; nothing
branches on a method's type. A method provides:

Required (the :class:`Method` protocol):

* ``name``, ``mergeable``, ``identity_at_init``, ``weight_space``, ``supports_mixed_batch``,
  ``combinable`` and ``layer_types`` (module kinds it adapts: ``"linear"``, ``"conv1d"``,
  ``"embedding"``, ``"block"``) as class attributes;
* ``wrap(base, shared, *, path, generator) -> layer``: the small module that holds the adapter's
  tensors for one adapted module (see the layer kinds below); ``generator`` is seeded per module;
* ``parameter_count(base)`` and ``stored_bytes(base)``: the closed forms of what one module's layer
  trains and what the saved file holds for it (checked against the real tensors by the tests).

Optional, with the default :func:`register` fills in when a method does not define it
(:data:`HOOK_DEFAULTS`), so callers never ask ``getattr``:

* ``model_level = False``: the method acts on a whole transformers body (embeddings, masks, KV
  cache) rather than on single layers; ``quantized_base = False``: it works on 4-bit (NF4) base
  modules because it only adds to their output (QLoRA), and ``float_base_reason = ""`` says why a
  method that does not needs the float weight (the refusals of :func:`deltatune.inject` and
  :func:`deltatune.quant.quantize` quote it); ``task_sequence = False``: the method learns
  tasks one after another in one adapter, with a ``tasks`` field naming them, oldest first, of which
  only the last trains (O-LoRA, AM-LoRA; grown by :func:`deltatune.continual.add_task`);
* ``make_shared(bases, generator) -> nn.Module | None`` (None): state shared by every layer of one
  adapter (VB-LoRA's bank), created once per adapter, counted by ``shared_parameter_count(bases)``
  and ``shared_stored_bytes(bases)`` (0); :func:`deltatune.inject` moves it (as each layer) to the
  device of the modules it serves before ``wrap`` sees it. A value a layer caches from tensors is
  keyed on all of them (:class:`deltatune._cache.Memo`: storage, version, dtype, device);
* ``default_targets(model) -> targets | None`` (None: no preference): where the method goes when no
  targets are given (a bottleneck adapter after each attention and FFN output; prompt tuning on the
  transformer body);
* ``check_targets(model, paths)`` (accept): refuse targets that contradict the method's fields;
* ``accepts(module) -> bool`` (True): whether it can adapt a module of a supported kind (BitFit:
  only layers with a bias); used to pick targets, never to skip a named one;
* ``fit_to(bases, given) -> method`` (itself): a copy whose fields not named in ``given`` (those the
  user left at their defaults) suit the modules it will adapt; the harness calls it, ``inject``
  never does;
* ``parameter_groups(attachment, name) -> {group: (params, lr multiplier)} | None`` (None: one
  group): optimizer groups with their own learning rates (VB-LoRA's logits, SAID's scales);
* ``combine_layers(parts) -> (method, layer)`` (a classmethod; only for ``combinable`` methods): the
  exact weighted combination of several adapters' layers on one module;
* training-process hooks, for methods that act between optimizer steps (AdaLoRA's rank budget,
  ReLoRA's restarts, Delta-LoRA's weight updates); :mod:`deltatune.stepping` calls them for every
  active adapter, from the harness, a plain loop or the ``Trainer`` callback:
  ``for_steps(total, given) -> method`` (itself): a copy fitted to a run of ``total`` optimizer
  steps for the fields not in ``given``, or a ``ValueError`` naming a field that does not fit the
  run (a schedule longer than it); ``regularizer(attachment, name) -> Tensor | None`` (None): a
  term added to the training loss before ``backward``, after the forward pass of the step's last
  micro-batch (a term may read that pass: AM-LoRA's gate sparsity); ``on_step(attachment, name, step,
  optimizer)`` (nothing): called after ``optimizer.step()`` and before the gradients are cleared,
  ``step`` counting optimizer steps from 1; ``lr_factor(step) -> float`` (1.0): a factor on the
  learning rate at scheduler step ``step`` (from 0), composed with the run's own schedule. State a
  method keeps between steps lives in its layers' (or shared module's) persistent buffers, so that
  a checkpoint holds it;
* ``stored_method() -> method`` (itself): the configuration written to ``adapter_config.json``
  when the saved form differs from the training form (PiSSA saves a plain LoRA);
* ``small_example`` ({}): field values that fit tiny models (docs, the CLI, the invariant suite);
  ``variants`` ({}): other configurations the invariant suite runs too (initialisers);
  ``near_identity_at_init`` (True: a method that is not ``identity_at_init`` still starts a small
  step from the base; False for prompts and prefixes, which change every output at once) and
  ``random_init`` (True: the seed changes the initial tensors): facts about the method's math that
  the invariant suite checks. They stay in the method's file, not in a table in the tests, so that
  a new method touches only its own file.

A method knows no file format but deltatune's own: PEFT translation lives in
:mod:`deltatune.formats.peft` (one translator per PEFT type, which imports the methods it reads and
writes; a method never imports it).

Layers (what ``wrap`` returns) are ``nn.Module``s of one of two kinds, told apart by ``additive``:

* :class:`AdditiveLayer` (``additive = True``): ``delta(x)`` is added to the base module's output;
  ``x`` is the module's input, or its output when the layer declares ``reads = "output"`` (an
  adapter placed after a projection). Several additive layers can run on one module, and per example
  (``route``).
* :class:`ReplacingLayer` (``additive = False``): ``forward(base, *args, **kwargs)`` computes the
  module's output itself, calling ``base`` as it needs (prompt and prefix tuning on a body).

Either kind may define ``delta_weight()`` (the update to ``base.weight``; used by ``merge``) or
``merged(base)`` (a plain module to put back instead), ``lowrank_factors() -> (A, B, scale) | None``
(lets the core run the fused low-rank kernel of :mod:`deltatune.lowrank`), and
``export_state()`` / ``import_state(state)`` when the saved tensors differ from the layer's
``state_dict`` (a collapsed reparameterisation, VB-LoRA's top-k form). :func:`layer_hooks` reads
these once, in one place.

Example: a complete method (a learned per-channel scale added to a Linear's output):

    >>> import dataclasses, torch
    >>> from torch import nn
    >>> from typing import ClassVar
    >>> from deltatune.contract import register
    >>> @register
    ... @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class OutputScale:
    ...     name: ClassVar[str] = "doctest_output_scale"
    ...     mergeable: ClassVar[bool] = False
    ...     identity_at_init: ClassVar[bool] = True
    ...     weight_space: ClassVar[bool] = False
    ...     supports_mixed_batch: ClassVar[bool] = True
    ...     combinable: ClassVar[bool] = False
    ...     layer_types: ClassVar[tuple[str, ...]] = ("linear",)
    ...     def wrap(self, base, shared, *, path, generator):
    ...         return ScaleLayer(base.out_features)
    ...     def parameter_count(self, base):
    ...         return base.out_features
    ...     def stored_bytes(self, base):
    ...         return 4 * base.out_features
    >>> class ScaleLayer(nn.Module):
    ...     additive = True
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

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Protocol, TypeVar, cast, runtime_checkable

import torch
from torch import nn

from . import targets as _targets
from .fields import validate


@runtime_checkable
class Method(Protocol):
    """What every method defines itself (a frozen dataclass: hence ``__dataclass_fields__``)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    name: ClassVar[str]
    mergeable: ClassVar[bool]
    identity_at_init: ClassVar[bool]
    weight_space: ClassVar[bool]
    supports_mixed_batch: ClassVar[bool]
    combinable: ClassVar[bool]
    layer_types: ClassVar[tuple[str, ...]]

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> nn.Module: ...

    def parameter_count(self, base: nn.Module) -> int: ...

    def stored_bytes(self, base: nn.Module) -> int: ...


class Registered(Method, Protocol):
    """A registered method: :class:`Method` plus every optional hook, each either the method's own or
    the default :func:`register` filled in (see the module docstring). Reach it with :func:`hooks`."""

    model_level: ClassVar[bool]
    quantized_base: ClassVar[bool]
    float_base_reason: ClassVar[str]
    task_sequence: ClassVar[bool]
    small_example: ClassVar[dict[str, Any]]
    variants: ClassVar[dict[str, dict[str, Any]]]
    near_identity_at_init: ClassVar[bool]

    def make_shared(self, bases: Mapping[str, nn.Module], generator: torch.Generator) -> nn.Module | None: ...

    def shared_parameter_count(self, bases: Mapping[str, nn.Module]) -> int: ...

    def shared_stored_bytes(self, bases: Mapping[str, nn.Module]) -> int: ...

    def default_targets(self, model: nn.Module) -> _targets.TargetSpec | None: ...

    def check_targets(self, model: nn.Module, paths: list[str]) -> None: ...

    def accepts(self, module: nn.Module) -> bool: ...

    def fit_to(self, bases: Mapping[str, nn.Module], given: Collection[str]) -> Method: ...

    def parameter_groups(
        self,
        attachment: Any,
        name: str,  # a deltatune.wrapper.Attachment (wrapper sits above this module)
    ) -> dict[str, tuple[list[nn.Parameter], float]] | None: ...

    def stored_method(self) -> Method: ...

    def for_steps(self, total: int, given: Collection[str]) -> Method: ...

    def regularizer(self, attachment: Any, name: str) -> torch.Tensor | None: ...

    def on_step(self, attachment: Any, name: str, step: int, optimizer: Any) -> None: ...

    def lr_factor(self, step: int) -> float: ...

    @property
    def random_init(self) -> bool: ...


class Combinable(Protocol):
    """A ``combinable`` method's class: :func:`deltatune.combine` builds one layer per module from
    several adapters' layers there, weighted (``parts``: (layer, weight) pairs), exactly."""

    @classmethod
    def combine_layers(cls, parts: list[tuple[nn.Module, float]]) -> tuple[Method, nn.Module]: ...


def _no_shared(self: Any, bases: Mapping[str, nn.Module], generator: torch.Generator) -> None:
    return None


def _zero(self: Any, bases: Mapping[str, nn.Module]) -> int:
    return 0


def _no_preference(self: Any, model: nn.Module) -> None:
    return None


def _accept_targets(self: Any, model: nn.Module, paths: list[str]) -> None:
    return None


def _accept_module(self: Any, module: nn.Module) -> bool:
    return True


def _as_written(self: Any, bases: Mapping[str, nn.Module], given: Collection[str]) -> Any:
    return self


def _one_group(self: Any, attachment: Any, name: str) -> None:
    return None


def _itself(self: Any) -> Any:
    return self


def _any_length(self: Any, total: int, given: Collection[str]) -> Any:
    return self


def _no_regularizer(self: Any, attachment: Any, name: str) -> None:
    return None


def _nothing_between_steps(self: Any, attachment: Any, name: str, step: int, optimizer: Any) -> None:
    return None


def _constant_lr(self: Any, step: int) -> float:
    return 1.0


#: The optional hooks and the default each registered class gets when it does not define one.
HOOK_DEFAULTS: dict[str, Any] = {
    "model_level": False,
    "quantized_base": False,
    "float_base_reason": "",
    "task_sequence": False,
    "small_example": {},
    "variants": {},
    "near_identity_at_init": True,
    "random_init": True,
    "make_shared": _no_shared,
    "shared_parameter_count": _zero,
    "shared_stored_bytes": _zero,
    "default_targets": _no_preference,
    "check_targets": _accept_targets,
    "accepts": _accept_module,
    "fit_to": _as_written,
    "parameter_groups": _one_group,
    "stored_method": _itself,
    "for_steps": _any_length,
    "regularizer": _no_regularizer,
    "on_step": _nothing_between_steps,
    "lr_factor": _constant_lr,
}


def hooks(method: Method) -> Registered:
    """``method`` seen with every optional hook (a registered class has them all, see :func:`register`)."""
    if REGISTRY.get(str(getattr(type(method), "name", ""))) is not type(method):
        given: object = method
        if isinstance(given, type) and any(given is cls for cls in REGISTRY.values()):
            raise ValueError(
                f"method: got the class {given.__name__}, not a config; pass an instance: "
                f"{given.__name__}() or {given.__name__}(field=value, ...)"
            )
        raise ValueError(
            f"method must be a registered deltatune method config (one of {sorted(REGISTRY)}), "
            f"got {type(method).__name__}"
        )
    return method  # (narrowed: its class is a registered one)


REGISTRY: dict[str, type[Registered]] = {}  # (filled by register: every hook present)
M = TypeVar("M", bound=Method)


@runtime_checkable
class AdditiveLayer(Protocol):
    """A layer whose ``delta`` is added to the base module's output."""

    additive: ClassVar[bool]  # True

    def delta(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ReplacingLayer(Protocol):
    """A layer that computes the module's output itself, calling ``base`` as it needs."""

    additive: ClassVar[bool]  # False

    def __call__(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any: ...


def float_weight_reason(method: Method) -> str:
    """Why a method that cannot adapt a 4-bit base (``quantized_base = False``) needs the float
    weight: its ``float_base_reason``, or the general one. Quoted by both refusals: injecting into a
    quantised module and quantising an adapted one."""
    cls = type(method).__name__
    own: str = hooks(method).float_base_reason
    return own or f"{cls} needs the float weight of the module it adapts"


def reads_output(layer: nn.Module) -> bool:
    """Whether an additive layer's ``delta`` reads the base module's output (not its input)."""
    return getattr(layer, "reads", "input") == "output"


def export_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a layer saves: its ``export_state()`` where it defines one, else what its
    ``state_dict()`` holds (:func:`module_tensors`)."""
    export = getattr(layer, "export_state", None)
    out: dict[str, torch.Tensor] = export() if export is not None else module_tensors(layer)
    return out


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()``'s keys and tensors (parameters and persistent buffers, detached), read
    from the modules themselves: no state-dict hooks run, so the whole parameters of a sharded model
    gathered for saving (FSDP2, :mod:`deltatune.train.sharding`) are read as they are, not resharded."""
    out: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in sub._parameters.items():
            if param is not None:
                out[dot + name] = param.detach()
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                out[dot + name] = buffer.detach()
    return out


def import_state(layer: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`export_state`: ``import_state(state)``, else a strict ``load_state_dict``."""
    load = getattr(layer, "import_state", None)
    if load is not None:
        load(state)
    else:
        layer.load_state_dict(state, strict=True)


def lowrank_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A, B, scale)`` when the layer's update is ``scale · B A x`` right now, else None."""
    factors = getattr(layer, "lowrank_factors", None)
    out: tuple[torch.Tensor, torch.Tensor, float] | None = factors() if factors is not None else None
    return out


CAPABILITIES = (
    "mergeable",
    "identity_at_init",
    "weight_space",
    "supports_mixed_batch",
    "combinable",
    "layer_types",
)


def register(cls: type[M]) -> type[M]:
    """Class decorator: add a method config class to :data:`REGISTRY` under ``cls.name``."""
    is_dataclass = dataclasses.is_dataclass(cls)  # (kept apart so that mypy keeps cls as type[M])
    if not is_dataclass:
        raise ValueError(f"{cls.__name__} must be a dataclass to be registered")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise ValueError(f"{cls.__name__} must be a frozen dataclass")
    missing = [c for c in ("name", *CAPABILITIES) if not hasattr(cls, c)]
    if missing:
        raise ValueError(f"{cls.__name__} must declare the class attributes {missing}")
    name = cls.name
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({REGISTRY[name].__name__})")
    for hook, default in HOOK_DEFAULTS.items():
        if not hasattr(cls, hook):
            setattr(cls, hook, default)
    REGISTRY[name] = cast("type[Registered]", cls)
    return cls


def method_from_config(name: str, fields: Mapping[str, Any]) -> Method:
    """Build a registered method from its name and a mapping of field values."""
    from .fields import Instance, from_jsonable

    cls = REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(REGISTRY)}")
    checks = {f.name: f.metadata.get("check") for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(checks))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(checks)}")
    kwargs = {
        k: from_jsonable(v, f"{cls.__name__}.{k}", checks[k] if isinstance(checks[k], Instance) else None)
        for k, v in fields.items()
    }
    return cls(**kwargs)


def method_fields(method: Method) -> dict[str, Any]:
    from .fields import to_jsonable

    return {f.name: to_jsonable(getattr(method, f.name)) for f in dataclasses.fields(method)}


def check(method: Method) -> None:
    """Validate a config against its declared field constraints (call from ``__post_init__``)."""
    validate(method)


def config_for(method: M, path: str, overrides: Mapping[str, Mapping[str, Any]]) -> M:
    """The method's configuration for the module at ``path``: ``method`` with the field values of
    every override key (exact path, dotted suffix or regex) that matches ``path``."""
    cfg = method
    for pattern, values in overrides.items():
        if _targets.pattern_matches(path, pattern):
            cfg = dataclasses.replace(cfg, **values)
    return cfg


def closed_form(
    method: Method,
    bases: Mapping[str, nn.Module],
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    modules_to_save: Mapping[str, nn.Module] | None = None,
) -> tuple[int, int]:
    """(trainable parameters, stored bytes) of ``method`` on ``bases`` (path -> module; weightless
    meta-device stand-ins are enough), from each method's own formulas: per module (with its
    ``overrides``), plus the state shared by all of them, plus full copies of ``modules_to_save``."""
    count = stored = 0
    for path, base in bases.items():
        cfg = config_for(method, path, overrides or {})
        count += cfg.parameter_count(base)
        stored += cfg.stored_bytes(base)
    count += hooks(method).shared_parameter_count(bases)
    stored += hooks(method).shared_stored_bytes(bases)
    for module in (modules_to_save or {}).values():
        for p in module.parameters():
            count += p.numel()
            stored += p.numel() * p.element_size()
    return count, stored
