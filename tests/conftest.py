import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def constraint_pins(name: str, python: str | None = None) -> dict[str, Any]:
    """The exact pins ``constraints/NAME`` gives on ``python`` (default: the running one), by
    normalised package name, as ``packaging`` Versions (lines with a ``python_version`` marker apply
    where it holds)."""
    import re

    from packaging.requirements import Requirement
    from packaging.version import Version

    python = python or f"{sys.version_info[0]}.{sys.version_info[1]}"
    pins: dict[str, Any] = {}
    for line in (Path(__file__).resolve().parents[1] / "constraints" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"constraints/{name}: {line!r} is not an exact pin (name==version)"
        if requirement.marker is not None and not requirement.marker.evaluate({"python_version": python}):
            continue
        key = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert key not in pins, f"constraints/{name}: {key} is pinned twice for Python {python}"
        pins[key] = Version(spec.version)
    return pins


def lock_pin(name: str) -> str | None:
    """The version constraints/lock.txt pins ``name`` to on the running Python, or None."""
    pinned = constraint_pins("lock.txt").get(name.lower())
    return None if pinned is None else str(pinned)


def require_peft_of_the_lock(behaviour: str) -> None:
    """Skip unless the installed peft is at least the release constraints/lock.txt pins for this
    Python: for oracle comparisons whose PEFT behaviour changed within the supported range
    (``behaviour`` says what)."""
    import pytest
    from packaging.version import Version

    peft = pytest.importorskip("peft")
    pinned = lock_pin("peft")
    if pinned is not None and Version(peft.__version__) < Version(pinned):
        pytest.skip(f"peft {peft.__version__} < {pinned} (the lock): {behaviour}")
