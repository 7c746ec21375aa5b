"""Where a benchmark's ``--json`` goes: one writer for every script."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | None, result: Any) -> None:
    """Write ``result`` as indented JSON to ``path`` (its folders made); nothing when ``path`` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
