"""Field constraints for method configs, declared as data.

A method config is a frozen dataclass whose fields carry a :class:`Check` in their metadata
(``param(default, check, help)``). One generic validator reads them, so every method reports bad
input the same way (``"LoRA.rank must be an integer >= 1, got 0"``), ``deltatune methods`` can
print the constraints, and the invariant suite can build a violating value for every field
without knowing any method.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class Check:
    """A constraint on one config field."""

    def ok(self, value: Any) -> bool:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement ok()")

    def describe(self) -> str:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement describe()")

    def counterexample(self) -> Any:
        """A value that this check refuses (used by the invariant suite)."""
        return object()

    def accepts_non_finite(self) -> bool:
        """Whether NaN and ±inf pass this check (only a field that opts in: ``Float(finite=False)``).

        The invariant suite gives every other field NaN, inf and -inf and expects them refused."""
        return False


@dataclass(frozen=True)
class Int(Check):
    min: int | None = None
    max: int | None = None

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        parts = ["an integer"]
        if self.min is not None:
            parts.append(f">= {self.min}")
        if self.max is not None:
            parts.append(f"<= {self.max}")
        return " ".join(parts)

    def counterexample(self) -> Any:
        if self.min is not None:
            return self.min - 1
        if self.max is not None:
            return self.max + 1
        return 1.5


@dataclass(frozen=True)
class IntOrNone(Int):
    """An integer in range, or None (the field is unset)."""

    def ok(self, value: Any) -> bool:
        return value is None or super().ok(value)

    def describe(self) -> str:
        return super().describe() + ", or None"


@dataclass(frozen=True)
class Float(Check):
    """A real number in an interval; ``low_open``/``high_open`` exclude the end points.

    NaN and ±inf are refused (a non-finite scale or probability makes every output non-finite)
    unless the field opts in with ``finite=False``; NaN is never accepted.
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    finite: bool = True

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.finite and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        bounded = math.isfinite(self.low) and math.isfinite(self.high)
        number = "a finite number" if self.finite and not bounded else "a number"
        if self.high == math.inf and self.low == -math.inf:
            return number
        if self.high == math.inf:
            return f"{number} {'>' if self.low_open else '>='} {self.low:g}"
        if self.low == -math.inf:
            return f"{number} {'<' if self.high_open else '<='} {self.high:g}"
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        return f"{number} in {lo}{self.low:g}, {self.high:g}{hi}"

    def accepts_non_finite(self) -> bool:
        return not self.finite

    def counterexample(self) -> Any:
        if self.low != -math.inf:
            return self.low if self.low_open else self.low - 1.0
        if self.high != math.inf:
            return self.high if self.high_open else self.high + 1.0
        return "not a number"


@dataclass(frozen=True)
class Bool(Check):
    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"

    def counterexample(self) -> Any:
        return "yes"


@dataclass(frozen=True)
class OneOf(Check):
    """Exactly one of ``options`` (compared with ``==``)."""

    options: tuple[Any, ...]

    def ok(self, value: Any) -> bool:
        return any(value == option and type(value) is type(option) for option in self.options)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def counterexample(self) -> Any:
        return "__not_an_option__"


@dataclass(frozen=True)
class Text(Check):
    """A non-empty string (a file path, a name)."""

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value)

    def describe(self) -> str:
        return "a non-empty string"

    def counterexample(self) -> Any:
        return ""


@dataclass(frozen=True)
class Names(Check):
    """A non-empty tuple of distinct names made of letters, digits and ``_`` (not starting with a
    digit): the keys a layer stores per name (a continual adapter's tasks)."""

    def ok(self, value: Any) -> bool:
        return (
            isinstance(value, tuple)
            and len(value) > 0
            and all(isinstance(v, str) and v.isidentifier() for v in value)
            and len(set(value)) == len(value)
        )

    def describe(self) -> str:
        return "a non-empty tuple of distinct identifiers"

    def counterexample(self) -> Any:
        return ("same", "same")


@dataclass(frozen=True)
class SubsetOf(Check):
    """A tuple of distinct values out of ``options`` (empty: the field's meaning says what)."""

    options: tuple[str, ...]

    def ok(self, value: Any) -> bool:
        return (
            isinstance(value, tuple)
            and all(isinstance(v, str) and v in self.options for v in value)
            and len(set(value)) == len(value)
        )

    def describe(self) -> str:
        return "a tuple of distinct names out of " + ", ".join(repr(o) for o in self.options)

    def counterexample(self) -> Any:
        return ("__not_an_option__",)


@dataclass(frozen=True)
class Instance(Check):
    """An instance of one of ``types`` (used for initialiser objects)."""

    types: tuple[type, ...]

    def ok(self, value: Any) -> bool:
        return isinstance(value, self.types)

    def describe(self) -> str:
        return "one of " + ", ".join(t.__name__ for t in self.types)

    def counterexample(self) -> Any:
        return "__not_an_initialiser__"

    def component_names(self) -> list[str]:
        """The registered components that fit (by name, in registration order)."""
        return [name for name, cls in COMPONENTS.items() if issubclass(cls, self.types)]


def param(default: Any, check: Check, help: str) -> Any:
    """Declare a config field with its constraint and one-line help."""
    return dataclasses.field(default=default, metadata={"check": check, "help": help})


def validate(config: Any) -> None:
    """Check every field of a config dataclass against its declared :class:`Check`.

    Raises:
        ValueError: ``"<Class>.<field> must be <constraint>, got <value>"``.
    """
    for f in dataclasses.fields(config):
        check = f.metadata.get("check")
        value = getattr(config, f.name)
        if isinstance(check, Check) and not check.ok(value):
            raise ValueError(f"{type(config).__name__}.{f.name} must be {check.describe()}, got {value!r}")


def field_table(cls: type) -> list[dict[str, Any]]:
    """The fields of a config class as plain data: name, default, constraint, help."""
    rows: list[dict[str, Any]] = []
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        rows.append(
            {
                "name": f.name,
                "default": to_jsonable(f.default),
                "constraint": check.describe() if isinstance(check, Check) else "",
                "help": f.metadata.get("help", ""),
            }
        )
        if isinstance(check, Instance):
            rows[-1]["choices"] = check.component_names()
    return rows


# Initialiser objects and other nested config values serialise as {"type": name, **fields}.
COMPONENTS: dict[str, type] = {}


def component(name: str) -> Any:
    """Class decorator: make a frozen dataclass usable as a serialisable config value."""

    def deco(cls: type) -> type:
        if name in COMPONENTS and COMPONENTS[name] is not cls:
            raise ValueError(f"component name {name!r} is already registered")
        COMPONENTS[name] = cls
        cls.component_name = name  # type: ignore[attr-defined]
        return cls

    return deco


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = getattr(type(value), "component_name", None)
        if name is None:
            raise ValueError(f"{type(value).__name__} is not a registered config component")
        out: dict[str, Any] = {"type": name}
        for f in dataclasses.fields(value):
            out[f.name] = to_jsonable(getattr(value, f.name))
        return out
    if isinstance(value, tuple):
        return [to_jsonable(v) for v in value]
    return value


def from_jsonable(value: Any, where: str, fits: Instance | None = None) -> Any:
    """Rebuild a value written by :func:`to_jsonable`; ``{"type": name, ...}`` becomes a component.

    ``fits``: the field's check; then only the components it accepts are known (LoRA's ``init``
    lists LoRA's initialisers, not prompt tuning's).
    """
    if isinstance(value, Mapping) and "type" in value:
        name = value["type"]
        cls = COMPONENTS.get(name)
        known = fits.component_names() if fits is not None else sorted(COMPONENTS)
        if cls is None:
            raise ValueError(f"{where}: unknown component type {name!r}; known: {', '.join(known)}")
        if fits is not None and name not in known:
            raise ValueError(
                f"{where}: {name!r} is a {cls.__name__}, not {fits.describe()}; it takes: {', '.join(known)}"
            )
        kwargs = {k: from_jsonable(v, f"{where}.{k}") for k, v in value.items() if k != "type"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}"
            )
        return cls(**kwargs)
    if isinstance(value, list):  # (to_jsonable writes a tuple as a list)
        return tuple(from_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value))
    return value
