"""The ``deltatune`` command line.

deltatune methods            registered methods with their fields, defaults and capabilities
deltatune methods --json     the same, as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import __version__
from .core import _CAPABILITIES, REGISTRY
from .fields import field_table


def methods_table() -> list[dict[str, Any]]:
    """Every registered method as plain data (name, class, docstring summary, capabilities, fields)."""
    rows = []
    for name, cls in sorted(REGISTRY.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append(
            {
                "name": name,
                "class": cls.__name__,
                "summary": doc[0] if doc else "",
                "capabilities": {c: _jsonable(getattr(cls, c)) for c in _CAPABILITIES},
                "fields": field_table(cls),
            }
        )
    return rows


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _print_methods(as_json: bool) -> None:
    rows = methods_table()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['name']}  ({row['class']}): {row['summary']}")
        caps = row["capabilities"]
        flags = [c for c, v in caps.items() if v is True]
        print(f"  capabilities: {', '.join(flags) or '-'}; layer types: {', '.join(caps['layer_types'])}")
        print("  fields:")
        width = max(len(f["name"]) for f in row["fields"])
        for f in row["fields"]:
            default = json.dumps(f["default"])
            print(f"    {f['name']:<{width}}  default {default:<22} {f['constraint']:<28} {f['help']}")
        print()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list the registered methods, their fields and capabilities")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        _print_methods(args.json)
        return 0
    return 2  # argparse already refused unknown commands


if __name__ == "__main__":
    sys.exit(main())
