"""Merge the pip freezes of one install per Python into one constraints file with markers.

    python3 scripts/merge_locks.py HEADER 3.11=freeze-311.txt 3.10=freeze-310.txt > constraints/lock.txt

The first freeze is the main one (the Python the project is developed on). A package at the same
version everywhere gets one plain line; one whose version differs on another Python (a release that
dropped that Python, or its dependencies) gets a line per Python with a ``python_version`` marker, so
that ``pip install -c constraints/lock.txt`` resolves on each of them. A package that only one
Python needs (a backport such as ``tomli`` on 3.10) is pinned for that Python alone. Pythons newer
than the main one take the main one's versions.
"""

from __future__ import annotations

import sys
from pathlib import Path


def read_freeze(path: str) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "==" not in line:
            continue
        name, _, version = line.partition("==")
        pins[name] = version
    return pins


def version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def merge(freezes: list[tuple[str, dict[str, str]]]) -> list[str]:
    """Constraint lines: ``freezes`` is [(python version, pins)], the main one first."""
    (main_py, main), *others = freezes
    ordered = sorted(freezes, key=lambda f: version_key(f[0]))
    lines = []
    for name in sorted({n for _, pins in freezes for n in pins}, key=str.lower):
        versions = {py: pins.get(name) for py, pins in freezes}
        if len(set(versions.values())) == 1:
            lines.append(f"{name}=={main[name]}")
            continue
        for py, version in versions.items():
            if version is None:
                continue
            if py == main_py:  # the main Python and every newer one
                older = [p for p, _ in ordered if version_key(p) < version_key(main_py)]
                newest_older = older[-1] if older else None
                marker = f'python_version > "{newest_older}"' if newest_older else ""
            else:
                marker = f'python_version == "{py}"'
            lines.append(f"{name}=={version}" + (f" ; {marker}" if marker else ""))
    del others
    return lines


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    header, specs = argv[1], argv[2:]
    freezes = []
    for spec in specs:
        py, sep, path = spec.partition("=")
        if not sep:
            print(f"merge_locks.py: expected PYTHON=FREEZE, got {spec!r}", file=sys.stderr)
            return 2
        freezes.append((py, read_freeze(path)))
    print(header)
    print("\n".join(merge(freezes)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
