"""Print the lower bounds that pyproject.toml declares, as exact pins (``name==version``).

Every dependency of the package and of its extras, except torch (the platform: CI machines carry one
CPU build of it, chosen by TORCH_SPEC). Used by ``scripts/lock.sh minimum`` and by the test that
checks constraints/minimum.txt against pyproject.toml.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
EXEMPT = {"torch"}


def lower_bounds(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{normalised name: lowest version} of every requirement; an error for one without ``>=``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += [r for r in extra if not r.startswith(project["name"] + "[")]
    bounds: dict[str, str] = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9][A-Za-z0-9.]*)", requirement.replace(" ", ""))
        if match is None:
            raise ValueError(f"pyproject.toml: {requirement!r} is not of the form name>=version")
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        if name not in EXEMPT:
            bounds[name] = match.group(2)
    return bounds


if __name__ == "__main__":
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in sorted(lower_bounds().items())))
