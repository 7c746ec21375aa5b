import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def lock_pin(name: str) -> str | None:
    """The version constraints/lock.txt pins ``name`` to on the running Python (a line with a
    ``python_version`` marker counts where the marker holds), or None where it pins none."""
    from packaging.requirements import Requirement

    lock = Path(__file__).resolve().parents[1] / "constraints" / "lock.txt"
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.name.lower() != name.lower():
            continue
        if requirement.marker is None or requirement.marker.evaluate():
            (spec,) = requirement.specifier
            return spec.version
    return None


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
