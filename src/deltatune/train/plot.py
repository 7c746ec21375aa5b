"""Loss and metric curves of a run, as a PNG (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _smooth(values: list[float], window: int) -> list[float]:
    out: list[float] = []
    acc = 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(record: dict[str, Any], path: str | Path) -> Path:
    """Training loss (raw and smoothed) and the main eval metric against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    history = record["history"]
    steps = [s for s, _ in history["loss"]]
    losses = [v for _, v in history["loss"]]
    main = record["main_metric"]
    evals = [(s, m[main]) for s, m in history["eval"] if main in m]
    cfg = record["config"]

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    window = max(1, len(losses) // 20)
    if window > 1:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train loss")
        smooth = _smooth(losses, window)
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"train loss (mean of {window})")
    else:
        ax.plot(steps, losses, color="tab:blue", linewidth=1.5, label="train loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in evals], [v for _, v in evals], "o-", color="tab:orange", label=f"eval {main}")
        ax2.set_ylabel(f"eval {main}", color="tab:orange")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        handles, labels = lines[0] + lines2[0], lines[1] + lines2[1]
    else:
        handles, labels = ax.get_legend_handles_labels()
    # Below the axes, where it can hide no point of either curve.
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    final = record["metrics"].get(main)
    title = f"{cfg['method']} on {record['task']} ({cfg['model']})"
    before = record.get("before")
    if final is not None:
        title += f": {main} {before[main]:.2f} -> {final:.2f}" if before else f": final {main} {final:.2f}"
    ax.set_title(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
