"""The registry of methods, and the functions that read a method as data."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

from .. import targets as _targets
from .fields import Instance, from_jsonable, to_jsonable
from .method import Method

#: Every registered method class by name (filled by :func:`register`).
REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=Method)

#: The capabilities every method states (class data; see :class:`Method`).
CAPABILITIES = (
    "mergeable",
    "identity_at_init",
    "weight_space",
    "supports_mixed_batch",
    "combinable",
    "layer_types",
)


def register(cls: type[M]) -> type[M]:
    """Class decorator: add a method class (a frozen dataclass subclassing :class:`Method`) to
    :data:`REGISTRY` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"{getattr(cls, '__name__', cls)!r} must subclass deltatune.contract.Method")
    is_dataclass = dataclasses.is_dataclass(cls)  # (kept apart so that mypy keeps cls as type[M])
    if not is_dataclass:
        raise ValueError(f"{cls.__name__} must be a dataclass to be registered")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise ValueError(f"{cls.__name__} must be a frozen dataclass")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} must declare its own name (a ClassVar[str])")
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise ValueError(f"a method named {name!r} is already registered ({REGISTRY[name].__name__})")
    REGISTRY[name] = cls
    return cls


def hooks(method: object) -> Method:
    """``method`` checked to be an instance of a registered method class."""
    if isinstance(method, Method) and REGISTRY.get(type(method).name) is type(method):
        return method
    if isinstance(method, type) and any(method is cls for cls in REGISTRY.values()):
        raise ValueError(
            f"method: got the class {method.__name__}, not a config; pass an instance: "
            f"{method.__name__}() or {method.__name__}(field=value, ...)"
        )
    raise ValueError(
        f"method must be a registered deltatune method config (one of {sorted(REGISTRY)}), "
        f"got {type(method).__name__}"
    )


def float_weight_reason(method: Method) -> str:
    """Why a method that cannot adapt a 4-bit base (``quantized_base = False``) needs the float
    weight: its ``float_base_reason``, or the general one. Quoted by both refusals: injecting into a
    quantised module and quantising an adapted one."""
    own = method.float_base_reason
    return own or f"{type(method).__name__} needs the float weight of the module it adapts"


def method_from_config(name: str, fields: Mapping[str, Any]) -> Method:
    """Build a registered method from its name and a mapping of field values."""
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
    """The method's fields in JSON form (what ``adapter_config.json`` records)."""
    return {f.name: to_jsonable(getattr(method, f.name)) for f in dataclasses.fields(method)}


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
    count += method.shared_parameter_count(bases)
    stored += method.shared_stored_bytes(bases)
    for module in (modules_to_save or {}).values():
        for p in module.parameters():
            count += p.numel()
            stored += p.numel() * p.element_size()
    return count, stored
