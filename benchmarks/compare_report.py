"""The tables and the plot of a ``compare.py`` results folder (``results.md``, ``scatter.png``).

    .venv/bin/python benchmarks/compare_report.py benchmarks/results/tuned   # redraw from results.json

Every classification panel draws the majority-class rate of its eval split (what a model that always
answers the commonest class scores), and a table row whose mean sits within a point of it says so.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

FLOOR_MARGIN = 1.0  # points: a mean this close to the majority-class rate is marked "at the floor"


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def majority(task: str, eval_limit: int | None = None) -> float | None:
    """The share (in %) of the commonest class in the eval split (the sample a run with
    ``eval_limit`` is judged on); None for tasks that are not classification or whose accuracy is not
    the main metric."""
    from deltatune.train.tasks import EVAL_SAMPLE_SEED, get_task, load_split

    t = get_task(task)
    if t.kind != "classification" or t.main_metric != "accuracy":
        return None
    examples = load_split(t, "eval", limit=eval_limit, seed=EVAL_SAMPLE_SEED)
    counts = Counter(e.label for e in examples)
    return round(100 * max(counts.values()) / len(examples), 2)


def majorities(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """:func:`majority` of every task of ``rows`` (on the eval sample the rows were judged on)."""
    out: dict[str, float | None] = {}
    for r in rows:
        if r["task"] not in out:
            try:
                out[r["task"]] = majority(r["task"], r.get("eval_limit"))
            except (OSError, ValueError):  # the data is not here: the table goes without it
                out[r["task"]] = None
    return out


def groups_of(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    return {k: sorted(v, key=lambda r: r.get("seed", 0)) for k, v in groups.items()}


def causal(rows: list[dict[str, Any]]) -> bool:
    """Whether the rows are the causal suite's (forgetting measured: three more columns)."""
    return any("forgetting" in r for r in rows)


CAUSAL_HEAD = " answer accuracy | s/step | forgetting |"


def causal_cells(rs: list[dict[str, Any]]) -> list[str]:
    """Final-answer accuracy, seconds per step and forgetting of a row's seeds (mean ± std where
    several); the main metric of the suite's chat data is the held-out loss."""

    def cell(values: list[float], digits: int) -> str:
        mean, std = spread(values)
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")

    return [
        cell([r["metrics"].get("answer_accuracy", float("nan")) for r in rs], 2),
        cell([r["train_seconds"] / r["steps"] for r in rs], 2),
        cell([r["forgetting"] for r in rs if "forgetting" in r], 3)
        if any("forgetting" in r for r in rs)
        else "",
    ]


def base_line(rows: list[dict[str, Any]]) -> list[str]:
    """The base model's own metrics on the eval set (runs made with ``eval_before``), where recorded:
    what every fine-tuned row is to be read against."""
    found: dict[str, list[dict[str, float]]] = {}
    for r in rows:
        if r.get("before"):
            found.setdefault(r["task"], []).append(r["before"])
    lines = []
    for task, befores in found.items():
        cells = ", ".join(
            f"{k.replace('_', ' ')} {befores[0][k]:.{2 if k.endswith('accuracy') else 4}f}"
            for k in befores[0]
        )
        lines.append(f"The base model on {task}'s eval set, before fine-tuning: {cells}.")
    return lines


def floor_note(mean: float, floor: float | None) -> str:
    return " (majority-class floor)" if floor is not None and mean - floor < FLOOR_MARGIN else ""


def seeds_markdown(rows: list[dict[str, Any]], command: str) -> str:
    """One line per (task, method): the metric's mean ± sample std over seeds, and each seed's value."""
    floors = majorities(rows)
    lines = [
        f"Made by `{command}`: mean ± sample standard deviation over the seeds (same data order per "
        "seed and the same step budget for every row of a task); train s is the median, peak MiB the max.",
        *(
            [
                "Majority-class rate of the eval split: "
                + ", ".join(f"{t} {f:.2f}" for t, f in floors.items() if f is not None)
                + "; a row within a point of it is marked."
            ]
            if any(f is not None for f in floors.values())
            else []
        ),
        *base_line(rows),
        "",
        "| task | method | lr | trainable params | stored bytes | metric | mean ± std | seeds | train s "
        "| peak MiB |" + (CAUSAL_HEAD if causal(rows) else ""),
        "|---|---|---:|---:|---:|---|---:|---|---:|---:|" + ("---:|" * 3 if causal(rows) else ""),
    ]
    for (task, method), rs in groups_of(rows).items():
        mean, std = spread([r["metric"] for r in rs])
        times = sorted(r["train_seconds"] for r in rs)
        cells = [
            task,
            method,
            f"{rs[0]['lr']:g}" if rs[0].get("lr") is not None else "",
            f"{rs[0]['trainable_parameters']:,}",
            f"{rs[0]['stored_bytes']:,}",
            rs[0]["main_metric"],
            f"{mean:.2f} ± {std:.2f}{floor_note(mean, floors.get(task))}",
            " / ".join(f"{r['metric']:.2f}" for r in rs)
            + f" (seeds {', '.join(str(r['seed']) for r in rs)})",
            f"{times[len(times) // 2]:.0f}",
            f"{max(r['peak_memory_MiB'] for r in rs):,}",
            *(causal_cells(rs) if causal(rows) else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    if len({r.get("seed", 0) for r in rows}) > 1:
        return seeds_markdown(rows, command)
    lines = [
        f"Made by `{command}` (seed {rows[0].get('seed', 0) if rows else 0}; same data order and step "
        "budget for every row of a task).",
        *base_line(rows),
        "",
        "| task | model | method | lr | trainable params | stored bytes | metric | value | train s "
        "| peak MiB |" + (CAUSAL_HEAD if causal(rows) else ""),
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|" + ("---:|" * 3 if causal(rows) else ""),
    ]
    for r in rows:
        cells = [
            r["task"],
            r["model"],
            r["method"],
            f"{r['lr']:g}" if r.get("lr") is not None else "",
            f"{r['trainable_parameters']:,}",
            f"{r['stored_bytes']:,}",
            r["main_metric"],
            f"{r['metric']:.2f}",
            f"{r['train_seconds']:.0f}",
            f"{r['peak_memory_MiB']:,}",
            *(causal_cells([r]) if causal(rows) else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MARKERS = "osD^vP*Xhp<>"


def compact(x: float) -> str:
    """1200 -> 1.2k, 3e6 -> 3M (tick labels that do not collide)."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= size:
            return f"{x / size:g}{unit}"
    return f"{x:g}"


def log_axis(ax: Any, values: list[float]) -> None:
    """A log-scaled x axis over ``values`` with a little room at both ends and labelled ticks however
    narrow the range (1-1.5-2-3-5-7 within half a decade, 1-2-3-5 within one, 1-2-5 within two and a
    half, decades beyond)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = min(values), max(values)
    decades = math.log10(high / low) if low > 0 else 3.0
    pad = 10 ** max(0.08, 0.06 * decades)
    ax.set_xscale("log")
    ax.set_xlim(low / pad, high * pad)
    subs = (
        (1, 1.5, 2, 3, 5, 7)
        if decades <= 0.5
        else (1, 2, 3, 5)
        if decades <= 1.2
        else (1, 2, 5)
        if decades <= 2.5
        else (1,)
    )
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: compact(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def scatter(rows: list[dict[str, Any]], path: Path) -> None:
    """Main metric against stored bytes, one point per method and task (mean, with the seeds' std as
    an error bar), a dashed majority-class line on classification panels, the legend to the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = groups_of(rows)
    tasks = list(dict.fromkeys(t for t, _ in groups))
    methods = list(dict.fromkeys(m for _, m in groups))
    floors = majorities(rows)
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    style = {m: (cmap(i % cmap.N), MARKERS[i % len(MARKERS)]) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for (t, method), rs in groups.items():
            if t != task:
                continue
            mean, std = spread([r["metric"] for r in rs])
            color, marker = style[method]
            ax.errorbar(
                rs[0]["stored_bytes"],
                mean,
                yerr=std if len(rs) > 1 else None,
                fmt=marker,
                color=color,
                markersize=7,
                capsize=3,
            )
        floor = floors.get(task)
        if floor is not None:
            ax.axhline(floor, color="0.4", linestyle="--", linewidth=1)
            ax.annotate(
                f"majority class {floor:.1f}",
                (0.01, floor),
                xycoords=("axes fraction", "data"),
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=8,
                color="0.3",
            )
        log_axis(ax, [rs[0]["stored_bytes"] for (t, _), rs in groups.items() if t == task])
        ax.set_xlabel("stored bytes (log scale)")
        ax.set_ylabel(next(r["main_metric"] for r in rows if r["task"] == task))
        seeds = max(len(rs) for (t, _), rs in groups.items() if t == task)
        ax.set_title(task + (f" (mean ± std of {seeds} seeds)" if seeds > 1 else ""))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker=style[m][1], linestyle="", color=style[m][0], label=m) for m in methods]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv if argv is not None else sys.argv[1:])[0])
    rows = json.loads((folder / "results.json").read_text())
    scatter(rows, folder / "scatter.png")
    print(f"wrote {folder / 'scatter.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
