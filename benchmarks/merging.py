"""Adapter arithmetic on real tasks (issue 29): three single-task LoRAs on MiniLM (SST-2, AG News,
MRPC), merged by each combination type, scored on all three tasks against the separate adapters.

For each seed, ``deltatune train`` fits one LoRA per task (rank 8 on query/value, the task's head
trained and saved with it). Then, for each task T, MiniLM with T's head gets T's adapter (with its
head) and the two others (without theirs: ``load(..., module_copies=False)``), and
:func:`deltatune.combine` merges the three with T's head kept (``keep_modules_of``); T's dev accuracy
is measured on a seeded sample. Rows: the separate adapter (the ceiling), the base with T's trained
head but no LoRA (the floor: what the merge adds over the head), ``linear`` at weights 1/3 (the
mean) and 1 (the sum), ``svd`` (rank 8 of the mean), ``ties``, ``dare_ties``, ``dare_linear`` and
``magnitude_prune`` at density 0.5 and weight 1 (TIES' elected mean; DARE rescales) with the
result stored at full rank, so that each row is the method itself and not a truncation of it.
One negation check rides along: SST-2's adapter minus itself gives the base's logits exactly.
Mean and standard deviation over the seeds; a plot of the mean per task.

    .venv/bin/python benchmarks/merging.py --seeds 0 1 2 --json benchmarks/results/merging/minilm.json \\
        --plot benchmarks/results/merging/minilm.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # type: ignore[import-not-found]

TASKS = ("sst2", "agnews", "mrpc")
ROWS: dict[str, dict[str, Any]] = {
    "linear (mean)": {"how": "linear", "weight": 1 / 3},
    "linear (sum)": {"how": "linear", "weight": 1.0},
    "svd r8 (mean)": {"how": "svd", "weight": 1 / 3, "rank": 8},
    "ties d0.5": {"how": "ties", "weight": 1.0, "density": 0.5, "rank": "full"},
    "dare_ties d0.5": {"how": "dare_ties", "weight": 1.0, "density": 0.5, "rank": "full"},
    "dare_linear d0.5 (mean)": {"how": "dare_linear", "weight": 1 / 3, "density": 0.5, "rank": "full"},
    "magnitude_prune d0.5 (mean)": {
        "how": "magnitude_prune",
        "weight": 1 / 3,
        "density": 0.5,
        "rank": "full",
    },
}


def train(task: str, seed: int, out: Path, args: argparse.Namespace) -> Path:
    cmd = [sys.executable, "-m", "deltatune.cli", "train", "--model", "minilm", "--task", task]
    cmd += ["--method", "lora", "--rank", "8", "--alpha", "16", "--steps", str(args.steps), "--lr", "1e-3"]
    cmd += ["--batch-size", "32", "--seed", str(seed), "--eval-limit", str(args.eval_limit), "--no-progress"]
    cmd += ["--checkpoint-every", "0", "--out", str(out), "--overwrite", "--data-dir", args.data_dir]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out / "adapter"


def score(task: str, adapters: dict[str, Path], args: argparse.Namespace, seed: int) -> dict[str, float]:
    import deltatune as dt
    from deltatune.train.config import TrainConfig
    from deltatune.train.evaluation import evaluate
    from deltatune.train.models import load_model
    from deltatune.train.tasks import get_task, load_split

    t = get_task(task)
    cfg = TrainConfig(model="minilm", task=task, eval_limit=args.eval_limit)
    examples = load_split(t, "eval", args.data_dir, limit=args.eval_limit, seed=seed)
    model, tokenizer = load_model("minilm", "classification", t.num_labels)
    model.eval()
    dt.load(model, adapters[task], name=task)
    others = [n for n in TASKS if n != task]
    for other in others:
        dt.load(model, adapters[other], name=other, activate=False, module_copies=False)

    def accuracy() -> float:
        return float(evaluate(model, tokenizer, t, examples, cfg, progress=False)[t.main_metric])

    out = {"separate adapter": accuracy()}
    # The floor: T's trained head alone (its LoRA scaled to zero).
    dt.combine(model, {task: 0.0}, "head_only", how="linear", keep_modules_of=task)
    dt.set_active(model, "head_only")
    out["head only (no LoRA)"] = accuracy()
    for i, (label, row) in enumerate(ROWS.items()):
        options = {k: v for k, v in row.items() if k not in ("weight",)}
        weights = {n: row["weight"] for n in (task, *others)}
        dt.combine(model, weights, f"row{i}", keep_modules_of=task, seed=seed, **options)
        dt.set_active(model, f"row{i}")
        out[label] = accuracy()
        dt.delete_adapter(model, f"row{i}")
    return out


def negation(adapter: Path) -> bool:
    """SST-2's adapter minus itself: the base's logits exactly (``linear``)."""
    import deltatune as dt
    from deltatune.train.models import load_model

    model, tokenizer = load_model("minilm", "classification", 2)
    model.eval()
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
    dt.load(model, adapter, name="a", module_copies=False)
    dt.load(model, adapter, name="b", activate=False, module_copies=False)
    dt.combine(model, {"a": 1.0, "b": -1.0}, "none", how="linear")
    dt.set_active(model, "none")
    with torch.no_grad():
        return bool(torch.equal(model(**batch).logits, base))


def plot(summary: dict[str, dict[str, tuple[float, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(next(iter(summary.values())))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(TASKS)
    for i, task in enumerate(TASKS):
        means = [summary[task][r][0] for r in rows]
        errs = [summary[task][r][1] for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], means, width, yerr=errs, label=task, capsize=2)
    ax.set_xticks([x + width for x in range(len(rows))])
    ax.set_xticklabels(rows, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title("Three MiniLM LoRAs merged (SST-2, AG News, MRPC): each task's head kept; mean ± sd")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    p.add_argument("--work", help="folder for the runs (default: a temporary one)")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    root = Path(args.work or tempfile.mkdtemp(prefix="deltatune-merging-"))
    runs: dict[int, dict[str, dict[str, float]]] = {}
    for seed in args.seeds:
        adapters = {t: train(t, seed, root / f"seed{seed}" / t, args) for t in TASKS}
        runs[seed] = {t: score(t, adapters, args, seed) for t in TASKS}
        print(f"seed {seed}: {json.dumps(runs[seed])}", flush=True)
    exact = negation(root / f"seed{args.seeds[0]}" / "sst2" / "adapter")
    summary: dict[str, dict[str, tuple[float, float]]] = {}
    for task in TASKS:
        rows = runs[args.seeds[0]][task]
        summary[task] = {}
        for row in rows:
            values = [runs[s][task][row] for s in args.seeds]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[task][row] = (statistics.mean(values), spread)
    result = {
        "config": vars(args),
        "negation_restores_the_base_exactly": exact,
        "runs": runs,
        "summary": summary,
    }
    for task in TASKS:
        print(task, {r: f"{m:.1f} ± {s:.1f}" for r, (m, s) in summary[task].items()})
    print(f"negation (adapter minus itself) gives the base's logits exactly: {exact}")
    write_json(args.json, result)
    if args.plot:
        plot(summary, args.plot)
    return result


if __name__ == "__main__":
    main()
