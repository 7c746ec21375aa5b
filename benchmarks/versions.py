"""Two versions of deltatune timed in one process, step by step: does a refactor cost anything?

This machine's speed drifts by ±30 % between runs, so two runs of ``speed.py`` (one per version)
cannot resolve a few percent. Here the other version's package (``--other``: a ``src`` folder, e.g.
of a ``git worktree``) is copied to a temporary folder as ``deltatune_other`` (its own absolute
``deltatune`` imports rewritten) and both versions adapt the same model weights in one process:
each round runs one training step (and one eval forward) of every row in turn, in the opposite
order every other round, and the table gives the median of the per-round ratios (this version /
the other), with its quartiles under ``spread``. ``floor`` is the frozen base.

    git worktree add /tmp/before aed7521
    .venv/bin/python benchmarks/versions.py --other /tmp/before/src --rows lora dora --rounds 9 \\
        --json benchmarks/results/speed/issue27-versions.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # type: ignore[import-not-found]
from speed import TARGETS, Run, build  # type: ignore[import-not-found]

import deltatune as dt

_IMPORT = re.compile(r"^(\s*)(from|import) deltatune\b", re.MULTILINE)


def other_version(src: Path) -> Any:
    """``src/deltatune`` imported as the package ``deltatune_other``."""
    root = Path(tempfile.mkdtemp(prefix="deltatune-other-"))
    shutil.copytree(src / "deltatune", root / "deltatune_other")
    for path in (root / "deltatune_other").rglob("*.py"):
        text = path.read_text()
        path.write_text(_IMPORT.sub(r"\1\2 deltatune_other", text))
    sys.path.insert(0, str(root))
    return importlib.import_module("deltatune_other")


def method(package: Any, row: str, rank: int) -> Any:
    if row == "lora":
        return package.LoRA(rank=rank, alpha=2 * rank)
    if row == "dora":
        return package.DoRA(rank=rank, alpha=2 * rank)
    raise ValueError(f"unknown row {row!r}: lora or dora")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", required=True, help="the other version's src folder (holding deltatune/)")
    p.add_argument("--rows", nargs="+", default=["lora", "dora"], choices=("lora", "dora"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--small", action="store_true")
    p.add_argument(
        "--control",
        action="store_true",
        help="also time a second model of this version per row ('this again'): the same-code ratio, "
        "in the same rounds, is the run's own noise floor",
    )
    p.add_argument("--json")
    args = p.parse_args(argv)
    other = other_version(Path(args.other))
    runs: dict[str, Run] = {}
    floor = build(args.small)
    for q in floor.parameters():
        q.requires_grad_(False)
    runs["floor"] = Run("floor", floor, [], floor=True)
    labels = [("this", dt), ("other", other)] + ([("again", dt)] if args.control else [])
    for row in args.rows:
        for label, package in labels:
            model = build(args.small)
            package.inject(model, method(package, row, args.rank), targets=TARGETS)
            runs[f"{row} {label}"] = Run(row, model, package.trainable_parameters(model))
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for run in runs.values():  # warm-up
        run.train_step(ids)
    train: dict[str, list[float]] = {k: [] for k in runs}
    evals: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.rounds):
        # the order alternates (ABBA): a row's place in the round (just after the floor, or last,
        # with another model's buffers freshly allocated) is not folded into its ratio
        order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]
        for name, run in order:
            train[name].append(run.train_step(ids))
            evals[name].append(run.eval_step(ids))
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in train.items()),
            flush=True,
        )

    def ratios(times: dict[str, list[float]], a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b], strict=True)]

    def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
        return round(statistics.median(ratios(times, a, b)), 4)

    result: dict[str, Any] = {
        "other": args.other,
        "rounds": args.rounds,
        "rank": args.rank,
        "train": {},
        "eval": {},
        "spread": {},
    }
    for row in args.rows:
        for kind, times in (("train", train), ("eval", evals)):
            result[kind][f"{row}: this / other"] = ratio(times, f"{row} this", f"{row} other")
            if args.control:
                result[kind][f"{row}: this / this again (control)"] = ratio(
                    times, f"{row} this", f"{row} again"
                )
            if args.rounds >= 4:
                q1, _, q3 = statistics.quantiles(ratios(times, f"{row} this", f"{row} other"), n=4)
                result["spread"][f"{kind} {row}: this / other, quartiles"] = [round(q1, 4), round(q3, 4)]
            result[kind][f"{row} this / floor"] = ratio(times, f"{row} this", "floor")
            result[kind][f"{row} other / floor"] = ratio(times, f"{row} other", "floor")
    print(json.dumps(result, indent=1))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
