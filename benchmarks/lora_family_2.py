"""LoRA family part 2 (issue 16) analysis of a ``compare.py --preset lora-family-2`` results folder.

Writes into the folder:

* ``adalora_ranks.png`` / ``adalora_ranks.json``: where AdaLoRA's rank went. For each task, the rank
  each adapted module kept at the end (its saved ``kept_rank``; a module the budget never cut keeps
  ``init_r``), per layer and module type, mean over seeds, next to the budget's uniform share
  (``target_r``).
* ``relora_rank.md`` / ``relora_rank.json``: ReLoRA against LoRA at equal steps on SmolLM2: the final
  training loss (mean of the last WINDOW steps), the eval metrics, and the effective rank of each
  module's total update (``deltatune.methods.lowrank.relora.effective_rank``: singular values above 1e-4 of
  the largest), min / mean / max over modules, from the saved adapters loaded onto the model.

    .venv/bin/python benchmarks/lora_family_2.py benchmarks/results/lora-family-2
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

WINDOW = 10  # steps in the final-loss mean
LAYER = re.compile(r"layer\.(\d+)\.")


def adalora_ranks(out: Path) -> dict[str, Any]:
    """task -> {"modules": {path: [kept rank per seed]}, "init_r", "target_r"} from the saved adapters."""
    found: dict[str, Any] = {}
    for run in sorted((out / "runs").glob("*-adalora*")):
        config_file = run / "adapter" / "adapter_config.json"
        if not config_file.exists():
            continue
        config = json.loads(config_file.read_text())
        fields = config["config"]
        task = config["task"]["name"]
        entry = found.setdefault(
            task, {"modules": {}, "init_r": fields["init_r"], "target_r": fields["target_r"]}
        )
        kept = {path: fields["kept_rank"] or fields["init_r"] for path in config["targets"]}
        for pattern, values in config["overrides"].items():
            path = pattern.strip("^$").replace("\\", "")
            if "kept_rank" in values:
                kept[path] = values["kept_rank"]
        for path, rank in kept.items():
            entry["modules"].setdefault(path, []).append(rank)
    return found


def plot_ranks(ranks: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(ranks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        modules = ranks[task]["modules"]
        kinds = sorted({p.rsplit(".", 1)[1] for p in modules})
        layers = sorted({int(m.group(1)) for p in modules if (m := LAYER.search(p))})
        grid = [[float("nan")] * len(layers) for _ in kinds]
        for p, values in modules.items():
            m = LAYER.search(p)
            if m is None:
                continue
            grid[kinds.index(p.rsplit(".", 1)[1])][layers.index(int(m.group(1)))] = statistics.mean(values)
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=ranks[task]["init_r"], aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="white", fontsize=9)
        ax.set_xticks(range(len(layers)), [str(v) for v in layers])
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_xlabel("layer")
        seeds = len(next(iter(modules.values())))
        ax.set_title(
            f"{task}: rank kept (init {ranks[task]['init_r']}, budget mean {ranks[task]['target_r']})\n"
            f"mean over {seeds} seed{'s' if seeds > 1 else ''}",
            fontsize=9,
        )
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("AdaLoRA on MiniLM: final rank per layer and module", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def relora_ranks(out: Path) -> dict[str, Any]:
    """label -> per seed: final loss, eval metrics, effective ranks of every module's update."""
    import torch

    import deltatune as dt
    from deltatune.methods.lowrank.relora import effective_rank
    from deltatune.train.models import load_model

    rows = json.loads((out / "results.json").read_text())
    picked = [r for r in rows if r["model"] == "smollm2"]
    found: dict[str, Any] = {}
    model = None
    for r in picked:
        run = out / r["run"]
        record = json.loads((run / "metrics.json").read_text())
        losses = [float(v) for _, v in record["history"]["loss"]]
        if model is None:
            model, _ = load_model("smollm2", "generation")
        dt.load(model, run / "adapter", name="probe")
        with torch.no_grad():
            ranks = [effective_rank(layer) for layer in dt.attachment_of(model).layers("probe").values()]
        dt.delete_adapter(model, "probe")
        found.setdefault(r["method"], {})[str(r["seed"])] = {
            "final_loss": round(statistics.mean(losses[-WINDOW:]), 4),
            "metrics": record["metrics"],
            "rank_min": min(ranks),
            "rank_mean": round(statistics.mean(ranks), 2),
            "rank_max": max(ranks),
            "modules": len(ranks),
        }
    return found


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def relora_markdown(found: dict[str, Any]) -> str:
    lines = [
        "ReLoRA against LoRA at equal steps on SmolLM2 (E2E); mean ± sample std over seeds "
        f"{', '.join(sorted({s for v in found.values() for s in v}))}. Final loss: the mean training loss "
        f"of the last {WINDOW} steps. Effective rank: singular values of each module's total update above "
        "1e-4 of its largest, min / mean / max over the adapted modules (mean over seeds).",
        "",
        "| method | final train loss | eval loss | effective rank min / mean / max |",
        "|---|---:|---:|---:|",
    ]
    for label, seeds in found.items():
        runs = list(seeds.values())
        eval_loss = [float(r["metrics"]["loss"]) for r in runs]
        lines.append(
            f"| {label} | {mean_std([r['final_loss'] for r in runs])} | {mean_std(eval_loss)} | "
            f"{statistics.mean(r['rank_min'] for r in runs):.1f} / "
            f"{statistics.mean(r['rank_mean'] for r in runs):.1f} / "
            f"{statistics.mean(r['rank_max'] for r in runs):.1f} |"
        )
    lines += [
        "",
        "Rerun: `.venv/bin/python benchmarks/lora_family_2.py benchmarks/results/lora-family-2`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else Path(__file__).parent / "results" / "lora-family-2"
    ranks = adalora_ranks(out)
    if ranks:
        (out / "adalora_ranks.json").write_text(json.dumps(ranks, indent=1) + "\n")
        plot_ranks(ranks, out / "adalora_ranks.png")
        print(f"wrote {out / 'adalora_ranks.png'}")
    if (out / "results.json").exists():
        found = relora_ranks(out)
        if found:
            (out / "relora_rank.json").write_text(json.dumps(found, indent=1) + "\n")
            (out / "relora_rank.md").write_text(relora_markdown(found))
            print((out / "relora_rank.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
