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

from conftest import constraint_pins  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _script() -> Any:
    """scripts/lower_bounds.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lower_bounds", ROOT / "scripts" / "lower_bounds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The Pythons pyproject.toml declares (requires-python >= 3.10) up to the newest CI tests.
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def _pins(name: str, python: str = "3.11") -> dict[str, Version]:
    """The exact pins ``constraints/NAME`` gives on ``python`` (conftest.constraint_pins)."""
    pins: dict[str, Version] = constraint_pins(name, python)
    return pins


def _requirements() -> list[Requirement]:
    project = _script().tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        found += [Requirement(r) for r in extra if not r.startswith("deltatune[")]
    return found


@pytest.mark.parametrize("python", PYTHONS)
def test_minimum_pins_the_declared_lower_bounds(python: str) -> None:
    bounds: dict[str, str] = _script().lower_bounds()
    assert {"transformers", "peft", "torchao", "safetensors"} <= set(bounds)
    pins = _pins("minimum.txt", python)
    wrong = {n: (str(pins.get(n)), v) for n, v in bounds.items() if pins.get(n) != Version(v)}
    assert not wrong, f"constraints/minimum.txt vs pyproject lower bounds (pinned, declared): {wrong}"


@pytest.mark.parametrize("python", PYTHONS)
def test_lock_pins_every_dependency_inside_its_declared_range(python: str) -> None:
    pins = _pins("lock.txt", python)
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


def test_the_declared_pythons_are_the_ones_ci_installs() -> None:
    """pyproject's requires-python and classifiers, and .ci/run's lowest and highest Python, agree."""
    project = _script().tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == f">={PYTHONS[0]}"
    classifiers = {
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if c.startswith("Programming Language :: Python :: 3.")
    }
    assert classifiers == set(PYTHONS)
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'LOWEST_PYTHON="${{LOWEST_PYTHON:-python{PYTHONS[0]}}}"' in ci
    assert f'HIGHEST_PYTHON="${{HIGHEST_PYTHON:-python{PYTHONS[-1]}}}"' in ci


def test_merged_locks_pin_each_python_once(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("merge_locks", ROOT / "scripts" / "merge_locks.py")
    assert spec is not None and spec.loader is not None
    merge_locks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_locks)
    lines = merge_locks.merge(
        [
            ("3.11", {"numpy": "2.4.6", "six": "1.0"}),
            ("3.10", {"numpy": "2.2.6", "six": "1.0", "tomli": "2.5"}),
        ]
    )
    assert lines == [
        'numpy==2.4.6 ; python_version > "3.10"',
        'numpy==2.2.6 ; python_version == "3.10"',
        "six==1.0",
        'tomli==2.5 ; python_version == "3.10"',
    ]


def test_the_oracle_gate_reads_the_lock_pin_of_this_python() -> None:
    """conftest.lock_pin (which gates the PEFT-oracle tests whose PEFT behaviour changed within the
    supported range) gives the one peft line of the lock whose marker holds in this interpreter's own
    environment (packaging's default), not a line meant for another Python."""
    from conftest import lock_pin

    text = (ROOT / "constraints" / "lock.txt").read_text().splitlines()
    lines = [Requirement(line.split("#", 1)[0]) for line in text if line.split("#", 1)[0].strip()]
    applicable = [r for r in lines if r.name == "peft" and (r.marker is None or r.marker.evaluate())]
    assert len(applicable) == 1, applicable
    (spec,) = applicable[0].specifier
    assert lock_pin("peft") == spec.version
    assert lock_pin("no-such-package") is None
