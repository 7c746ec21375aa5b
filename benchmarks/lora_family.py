"""LoRA family (issue 15) analysis of a ``compare.py --preset lora-family`` results folder.

Writes ``steps_to_loss.md`` / ``steps_to_loss.json``: for each task and seed, the training loss LoRA r=8
ends at (the mean of its last WINDOW steps) and the first step at which each other row's running mean
over WINDOW steps is at or below it; LoRA+'s claim (Hayou et al. 2024) is that it gets there in fewer
steps. Also ``bytes.md``: each row's stored bytes against LoRA r=8's.

    .venv/bin/python benchmarks/lora_family.py benchmarks/results/lora-family
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WINDOW = 10  # steps in the running mean (one step's loss on 16-32 examples is noisy)
REFERENCE = "LoRA r=8"


def running_mean(losses: list[float], window: int = WINDOW) -> list[float]:
    """Mean of the last ``window`` values at each step (fewer at the start)."""
    out = []
    for i in range(len(losses)):
        part = losses[max(0, i + 1 - window) : i + 1]
        out.append(sum(part) / len(part))
    return out


def steps_to(losses: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose running mean loss is <= target; None if it never is."""
    steps = [s for s, _ in losses]
    for step, value in zip(steps, running_mean([v for _, v in losses]), strict=True):
        if value <= target:
            return step
    return None


def analyse(out: Path) -> dict[str, Any]:
    rows = json.loads((out / "results.json").read_text())
    curves: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    for r in rows:
        record = json.loads((out / r["run"] / "metrics.json").read_text())
        curves[(r["task"], r["method"], r["seed"])] = [
            (int(s), float(v)) for s, v in record["history"]["loss"]
        ]
    table: dict[str, Any] = {}
    for (task, method, seed), losses in sorted(curves.items()):
        ref = curves.get((task, REFERENCE, seed))
        if ref is None:
            continue
        target = sum(v for _, v in ref[-WINDOW:]) / min(WINDOW, len(ref))
        entry = table.setdefault(task, {}).setdefault(method, {})
        entry[str(seed)] = {"target": round(target, 4), "steps": steps_to(losses, target)}
    return table


def markdown(table: dict[str, Any]) -> str:
    lines = [
        f"Steps until the running mean (over {WINDOW} steps) of the training loss first reaches the loss "
        f"{REFERENCE} ends at (the mean of its last {WINDOW} steps), per seed; '—': never within the "
        "budget. Made by `python benchmarks/lora_family.py benchmarks/results/lora-family`.",
        "",
        "| task | method | seed 0 | seed 1 | seed 2 | mean |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task, methods in table.items():
        for method, seeds in methods.items():
            cells = [seeds.get(str(s), {}).get("steps") for s in range(3)]
            reached = [c for c in cells if c is not None]
            mean = f"{sum(reached) / len(reached):.0f}" if len(reached) == len(cells) else "—"
            shown = ["—" if c is None else str(c) for c in cells]
            lines.append(f"| {task} | {method} | " + " | ".join(shown) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def main(out: Path) -> None:
    table = analyse(out)
    (out / "steps_to_loss.json").write_text(json.dumps(table, indent=1))
    (out / "steps_to_loss.md").write_text(markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
