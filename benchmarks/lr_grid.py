"""Each method at its own learning rate: the grid that ``compare.py --lr-grid`` runs and the choice.

For every row, the grid trains one seed at each rate ``centre x m`` (``m`` in ``--lr-grid``, default 1/3,
1, 3, 10: 30x in all, one below the centre and two above, since a 150-step run favours higher rates than
the papers' long ones). The centre is the row's ``lr`` where it names one, else the method's own default
(``deltatune.train.config.default_lr``). Every grid run holds ``validation`` training examples out (a
fixed draw) and the rate with the best validation metric is chosen; the reported eval split plays no part
in the choice. Ties go to the rate nearer the centre. Where the best rate is the highest (or lowest)
tried, the grid goes one step (3x) further, up to ``EXTEND`` times. A row's grid keeps the centre it was
first run with (``grid.json``), since the grid's own choice becomes the method's default.

A grid point that fails (a divergence, say) is recorded with its error and never chosen."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

GRID = (1 / 3, 1.0, 3.0, 10.0)
EXTEND = 2  # at most this many rates added beyond an end of the grid where the best sits there


def centre(row: Any, recorded: dict[str, float] | None = None) -> float:
    """The rate the grid is centred on: the one an earlier grid of the row was centred on (``recorded``,
    by label, from ``grid.json``: a default the grid itself moved must not move the grid), else the
    row's own ``lr``, else the method's default."""
    from deltatune.train.config import default_lr

    if recorded and row.label in recorded:
        return recorded[row.label]
    given = row.options.get("lr")
    return float(given) if given is not None else default_lr(row.method, row.fields)


def rate(x: float) -> float:
    """A grid rate rounded to 2 significant digits (what the label, the folder and the record show)."""
    return float(f"{x:.2g}")


def grid_rows(
    row: Any, multipliers: tuple[float, ...], recorded: dict[str, float] | None = None
) -> list[Any]:
    """The row once per rate of its grid (labels and run folders name the rate)."""
    c = centre(row, recorded)
    return [
        replace(row, label=f"{row.label} @ lr {rate(c * m):g}", options={**row.options, "lr": rate(c * m)})
        for m in multipliers
    ]


def further(row: Any, results: list[dict[str, Any]], centred: float | None = None) -> Any:
    """The row at one more rate (3x beyond the end) where the best so far sits at an end of the rates
    tried, else None: a choice at the edge says the best rate may lie beyond it."""
    best = choose(row, results, centred)["lr"]
    rates = sorted(r["lr"] for r in results)
    if best == rates[-1]:
        lr = rate(best * 3)
    elif best == rates[0]:
        lr = rate(best / 3)
    else:
        return None
    return replace(row, label=f"{row.label} @ lr {lr:g}", options={**row.options, "lr": lr})


def choose(row: Any, results: list[dict[str, Any]], centred: float | None = None) -> dict[str, Any]:
    """The grid result with the best validation metric (of the row's own main metric); ties go to the
    rate nearer the centre. ``ValueError`` if no grid point finished."""
    done = [r for r in results if r.get("validation") is not None]
    if not done:
        raise ValueError(f"{row.label}: no grid point finished: {[r.get('error') for r in results]}")
    c = centre(row) if centred is None else centred
    return max(done, key=lambda r: (r["validation"], -abs(math.log(r["lr"] / c))))


def summary(row: Any, results: list[dict[str, Any]], centred: float) -> dict[str, Any]:
    """What ``grid.json`` keeps of one row's grid: its centre, every point and the choice."""
    best = choose(row, results, centred)
    return {
        "method": row.label,
        "method_name": row.method,
        "centre": centred,
        "points": [
            {
                "lr": r["lr"],
                "validation": r.get("validation"),
                "eval": r.get("metric"),
                **({"error": r["error"]} if "error" in r else {}),
            }
            for r in sorted(results, key=lambda r: r["lr"])
        ],
        "chosen_lr": best["lr"],
        "at_edge": best["lr"] in (min(r["lr"] for r in results), max(r["lr"] for r in results)),
    }


def markdown(grids: list[dict[str, Any]], task: str, size: int, command: str) -> str:
    """One line per row: the validation metric at each rate, the chosen rate in bold."""
    lines = [
        f"Made by `{command}`: one seed (0) per rate on {task}, {size} training examples held out as the "
        "validation set (a fixed draw; the reported eval split plays no part). Validation metric at each "
        "rate, the chosen one in bold; `edge` marks a choice at the end of the grid (the best rate may "
        "lie beyond it); `failed` a run that diverged.",
        "",
        "| method | centre | rates: validation metric | chosen lr |",
        "|---|---:|---|---:|",
    ]
    for g in grids:
        cells = []
        for p in g["points"]:
            value = "failed" if p["validation"] is None else f"{p['validation']:.2f}"
            text = f"{p['lr']:g}: {value}"
            cells.append(f"**{text}**" if p["lr"] == g["chosen_lr"] else text)
        edge = " (edge)" if g["at_edge"] else ""
        lines.append(f"| {g['method']} | {g['centre']:g} | {' · '.join(cells)} | {g['chosen_lr']:g}{edge} |")
    return "\n".join(lines) + "\n"
