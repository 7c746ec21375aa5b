"""The committed constraints files agree with what pyproject.toml declares.

constraints/minimum.txt must pin every direct dependency at exactly its declared lower bound (so CI's
minimum run tests the floor users are promised), and constraints/lock.txt must pin every direct
dependency inside its declared range (so the lock is a configuration users can reach).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _script() -> Any:
    """scripts/lower_bounds.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lower_bounds", ROOT / "scripts" / "lower_bounds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(name: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        assert match, f"constraints/{name}: {line!r} is not an exact pin (name==version)"
        pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = Version(match.group(2))
    return pins


def _requirements() -> list[Requirement]:
    project = _script().tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        found += [Requirement(r) for r in extra if not r.startswith("deltatune[")]
    return found


def test_minimum_pins_the_declared_lower_bounds() -> None:
    bounds: dict[str, str] = _script().lower_bounds()
    assert {"transformers", "peft", "torchao", "safetensors"} <= set(bounds)
    pins = _pins("minimum.txt")
    wrong = {n: (str(pins.get(n)), v) for n, v in bounds.items() if pins.get(n) != Version(v)}
    assert not wrong, f"constraints/minimum.txt vs pyproject lower bounds (pinned, declared): {wrong}"


def test_lock_pins_every_dependency_inside_its_declared_range() -> None:
    pins = _pins("lock.txt")
    for requirement in _requirements():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"constraints/lock.txt does not pin {name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints/lock.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_lower_bounds_refuses_a_requirement_without_a_floor(tmp_path: Path) -> None:
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\nname = "x"\ndependencies = ["numpy"]\n')
    with pytest.raises(ValueError, match="'numpy' is not of the form name>=version"):
        _script().lower_bounds(bad)
