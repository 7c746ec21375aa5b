import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def require_peft_of_the_lock(behaviour: str) -> None:
    """Skip unless the installed peft is at least the release constraints/lock.txt pins: for oracle
    comparisons whose PEFT behaviour changed within the supported range (``behaviour`` says what)."""
    import re
    from pathlib import Path

    import pytest
    from packaging.version import Version

    peft = pytest.importorskip("peft")
    lock = (Path(__file__).resolve().parents[1] / "constraints" / "lock.txt").read_text()
    pinned = re.search(r"^peft==(\S+)$", lock, re.M)
    if pinned is not None and Version(peft.__version__) < Version(pinned.group(1)):
        pytest.skip(f"peft {peft.__version__} < {pinned.group(1)} (the lock): {behaviour}")
