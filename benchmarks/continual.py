"""Continual learning (catastrophic forgetting): SST-2 -> AG News -> MRPC on MiniLM, one head per task.

Each method trains an adapter on "query" and "value" (rank 8, alpha 16) through three stages, one task
per stage; every task has its own classification head (a fresh ``nn.Linear(384, n_classes)``, the same
initial head for every method at a given seed), trained only during its own stage and frozen afterwards.
After each stage every task seen so far is evaluated with its own head, which fills the accuracy matrix
``R[stage][task]``. Reported: the average accuracy after the last stage (``mean_i R[T-1][i]``) and the
backward transfer ``BWT = mean_{i<T-1} (R[T-1][i] - R[i][i])`` (negative: forgetting).

Methods:

* ``seq-lora``: one LoRA trained on each task in turn (the baseline: nothing protects old tasks);
* ``olora``: O-LoRA (``deltatune.continual`` with ``dt.OLoRA``): a new LoRA per task, the old ones frozen,
  the new one kept orthogonal to them;
* ``amlora``: AM-LoRA (``deltatune.continual`` with ``dt.AMLoRA``): a new LoRA per task, the old ones
  frozen, an attentional mixer (with a sparse gate) combining them;
* ``separate-lora``: one LoRA per task, the task id known at evaluation (each task evaluated with its
  own adapter): no forgetting by construction, the upper bound.

Per stage: AdamW (adapter and head at lr 1e-3), linear warmup over 6 % of the steps then linear decay,
gradient clipping at 1.0, batch 32 at max length 64 (SST-2, AG News) or batch 16 at 128 (MRPC),
``--steps`` steps (default 100). Training data: the task's train split (AG News trains on its
10,001-example file); evaluation: seeded 500-example subsets of the SST-2 and AG News eval splits and
the full MRPC one (the same examples for every method and seed). Each (method, seed) run is written to
``OUT/runs/<method>-seed<s>.json`` as soon as it finishes (``--reuse`` skips those that exist, so a long
run can be resumed), with its final adapter(s) and heads saved in ``OUT/runs/<method>-seed<s>/``; the
saved adapter is loaded onto a fresh model (``dt.continual.load`` for O-LoRA and AM-LoRA, ``dt.load``
otherwise) and must give the same predictions on the first task. At the end: ``results.json`` (every run
and the aggregates), ``results.md`` (one table, mean ± sample std over seeds), ``heatmap-<method>.png``
(task x stage, mean over seeds) and ``heatmaps.png`` (all methods side by side).

    .venv/bin/python benchmarks/continual.py            # 4 methods x 3 seeds: ~7 h on 2 busy cores
    .venv/bin/python benchmarks/continual.py --reuse    # resume: skip the runs already written
    .venv/bin/python benchmarks/continual.py --steps 3 --eval-limit 64 --seeds 0 --out /tmp/continual-smoke

Times are wall-clock seconds on a shared machine: read them as rough costs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt
from deltatune.train.batches import Collator, batch_positions
from deltatune.train.config import TrainConfig
from deltatune.train.data import Example
from deltatune.train.evaluation import evaluate
from deltatune.train.loop import lr_lambda, step
from deltatune.train.models import load_model
from deltatune.train.tasks import Task, compute, get_task, load_split

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stage:
    """One task of the sequence: its name, max length, batch size and eval limit (None: the full split)."""

    task: str
    max_length: int
    batch: int
    eval_limit: int | None = None


# The budgets of the MiniLM presets of compare.py (MRPC: batch 16 at length 128); seeded 500-example
# eval subsets of SST-2 and AG News keep the six evaluations of a run short.
SEQUENCE = (
    Stage("sst2", 64, 32, eval_limit=500),
    Stage("agnews", 64, 32, eval_limit=500),
    Stage("mrpc", 128, 16),
)
METHODS = ("seq-lora", "olora", "amlora", "separate-lora")
CONTINUAL = ("olora", "amlora")  # the methods that go through deltatune.continual
LABELS = {
    "seq-lora": "sequential LoRA",
    "olora": "O-LoRA",
    "amlora": "AM-LoRA",
    "separate-lora": "separate LoRA per task (task id known)",
}
MODEL = "minilm"
TARGETS = ["query", "value"]
RANK, ALPHA = 8, 16.0
LR, HEAD_LR = 1e-3, 1e-3
WARMUP = 0.06
MAX_GRAD_NORM = 1.0
EVAL_BATCH = 64
EVAL_SEED = 0  # the AG News eval subset: one for every method and seed
SEQ_NAME = "seq"  # the adapter name of sequential LoRA
CONTINUAL_NAME = "continual"
LOGIT_TOLERANCE = 1e-6  # the load check: logits this close, or the same predictions
LOSS_WINDOW = 10  # the training loss of a stage: the mean of its last steps


@dataclass
class Data:
    task: Task
    stage: Stage
    train: Sequence[Example]
    eval: Sequence[Example]


def load_data(eval_limit: int | None) -> list[Data]:
    """Every stage's task, training and evaluation examples (``eval_limit`` caps every eval split)."""
    out = []
    for stage in SEQUENCE:
        task = get_task(stage.task)
        limits = [x for x in (stage.eval_limit, eval_limit) if x is not None]
        limit = min(limits) if limits else None
        train = load_split(task, "train")
        held = load_split(task, "eval", limit=limit, seed=EVAL_SEED if limit is not None else None)
        out.append(Data(task, stage, train, held))
    return out


# -- heads ---------------------------------------------------------------------------------------


def make_head(model: nn.Module, num_labels: int, seed: int, index: int) -> nn.Linear:
    """Task ``index``'s fresh head, initialised as BERT initialises its classifier (normal with the
    config's ``initializer_range``, zero bias) from a generator seeded by (seed, index): the same initial
    head for every method at a given seed; the global RNG is not touched."""
    config: Any = model.config
    head = nn.Linear(int(config.hidden_size), num_labels)
    generator = torch.Generator().manual_seed(seed * 1_000 + index)
    with torch.no_grad():
        head.weight.normal_(0.0, float(config.initializer_range), generator=generator)
        head.bias.zero_()
    return head


def use_head(model: nn.Module, head: nn.Linear, trainable: bool) -> None:
    """Swap ``head`` in as the model's classifier (its label count too)."""
    model.classifier = head
    model.config.num_labels = head.out_features  # type: ignore[union-attr]
    head.requires_grad_(trainable)


# -- adapters ------------------------------------------------------------------------------------


def continual_method(method: str) -> Any:
    if method == "olora":
        return dt.OLoRA(rank=RANK, alpha=ALPHA)
    return dt.AMLoRA(rank=RANK, alpha=ALPHA)


def add_stage_adapter(model: nn.Module, method: str, index: int, task: str, seed: int) -> None:
    """Set up the body adapter that trains during stage ``index``."""
    lora = dt.LoRA(rank=RANK, alpha=ALPHA)
    if method == "seq-lora":
        if index == 0:
            dt.inject(model, lora, targets=TARGETS, name=SEQ_NAME, seed=seed)
        dt.set_active(model, SEQ_NAME)
    elif method == "separate-lora":
        dt.inject(model, lora, targets=TARGETS, name=task, seed=seed)
        dt.set_active(model, task)
    elif index == 0:
        dt.continual.start(
            model, continual_method(method), task, targets=TARGETS, name=CONTINUAL_NAME, seed=seed
        )
    else:
        dt.continual.add_task(model, task, name=CONTINUAL_NAME)


def body_adapters(method: str, tasks: Sequence[str]) -> list[str]:
    """The names of the body adapters that exist after training on ``tasks``."""
    if method == "seq-lora":
        return [SEQ_NAME]
    if method == "separate-lora":
        return list(tasks)
    return [CONTINUAL_NAME]


def adapter_for_eval(model: nn.Module, method: str, task: str) -> None:
    """Only separate LoRA knows the task id; the others run the whole adapter on every task."""
    if method == "separate-lora":
        dt.set_active(model, task)


def stored_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Bytes of tensor data the body adapters store (heads apart)."""
    return sum(dt.parameter_report(model, n).stored_bytes for n in names)


# -- one run -------------------------------------------------------------------------------------


def train_stage(
    model: nn.Module, tokenizer: Any, data: Data, head: nn.Linear, steps: int, seed: int
) -> tuple[float, int, int]:
    """Train the active adapter and ``head`` on one task; return (final loss, adapter and head params)."""
    adapter = [p for p in dt.trainable_parameters(model) if p.requires_grad]
    head_params = list(head.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": adapter, "lr": LR, "name": "adapter"},
            {"params": head_params, "lr": HEAD_LR, "name": "head"},
        ],
        lr=LR,
        weight_decay=0.0,
    )
    schedule = lr_lambda(TrainConfig(steps=steps, warmup_ratio=WARMUP, schedule="linear"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    collate = Collator(data.task, tokenizer, data.stage.max_length)
    losses = []
    model.train()
    for k in range(steps):
        positions = batch_positions(k, data.stage.batch, len(data.train), seed)
        batch = collate([data.train[i] for i in positions])
        loss = step(
            model,
            [batch],
            data.task.kind,
            optimizer,
            scheduler,
            max_grad_norm=MAX_GRAD_NORM,
            number=k + 1,
        )
        losses.append(loss)
    final = sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:])
    return final, sum(p.numel() for p in adapter), sum(p.numel() for p in head_params)


def accuracy(model: nn.Module, tokenizer: Any, data: Data) -> float:
    """Accuracy in percent on the task's eval examples."""
    cfg = TrainConfig(max_length=data.stage.max_length, eval_batch_size=EVAL_BATCH)
    metrics = evaluate(model, tokenizer, data.task, data.eval, cfg, progress=False)
    return float(metrics["accuracy"])


@torch.no_grad()
def logits_on(model: nn.Module, tokenizer: Any, data: Data) -> torch.Tensor:
    """The model's logits on every eval example of ``data`` (eval mode, batches of EVAL_BATCH)."""
    was = model.training
    model.eval()
    collate = Collator(data.task, tokenizer, data.stage.max_length)
    out = []
    for i in range(0, len(data.eval), EVAL_BATCH):
        batch = collate(data.eval[i : i + EVAL_BATCH])
        batch.pop("labels")
        out.append(model(**batch).logits.float())
    model.train(was)
    return torch.cat(out)


def save_and_check(
    model: nn.Module,
    tokenizer: Any,
    method: str,
    heads: list[nn.Linear],
    datas: list[Data],
    folder: Path,
    seed: int,
    trained_accuracy: float,
) -> dict[str, Any]:
    """Save the final adapter(s) and heads into ``folder``; load them onto a fresh model and check that
    it reproduces the trained model on the first task: logits within LOGIT_TOLERANCE or the same
    predictions, and the accuracy measured after the last stage (``trained_accuracy``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    first = datas[0]
    names = body_adapters(method, [d.task.name for d in datas])
    for name in names:
        dt.save(model, folder / f"adapter-{name}", adapter=name)
    save_file(
        {
            f"{d.task.name}.{k}": v.detach().contiguous()
            for d, h in zip(datas, heads, strict=True)
            for k, v in h.state_dict().items()
        },
        str(folder / "heads.safetensors"),
    )
    eval_name = first.task.name if method == "separate-lora" else names[0]
    use_head(model, heads[0], trainable=False)
    adapter_for_eval(model, method, first.task.name)
    expected = logits_on(model, tokenizer, first)

    fresh, _ = load_model(MODEL, "classification", num_labels=2, seed=seed)
    if method in CONTINUAL:
        dt.continual.load(fresh, folder / f"adapter-{eval_name}")
    else:
        dt.load(fresh, folder / f"adapter-{eval_name}", name=eval_name)
    head = nn.Linear(heads[0].in_features, heads[0].out_features)
    head.load_state_dict(heads[0].state_dict())
    use_head(fresh, head, trainable=False)
    got = logits_on(fresh, tokenizer, first)
    diff = float((got - expected).abs().max())
    same = bool(torch.equal(got.argmax(-1), expected.argmax(-1)))
    acc_expected = float(compute(first.task, expected.argmax(-1).tolist(), first.eval)["accuracy"])
    acc_loaded = float(compute(first.task, got.argmax(-1).tolist(), first.eval)["accuracy"])
    if acc_expected != trained_accuracy:
        raise AssertionError(
            f"{method} seed {seed}: the trained model's accuracy on {first.task.name} moved between the last "
            f"stage's evaluation ({trained_accuracy}) and the load check ({acc_expected})"
        )
    if not (diff <= LOGIT_TOLERANCE or same):
        raise AssertionError(
            f"{method} seed {seed}: the adapter loaded from {folder} does not reproduce the trained model on "
            f"{first.task.name}: accuracy {acc_loaded} vs {acc_expected}, max logit difference {diff:.3g}"
        )
    return {
        "task": first.task.name,
        "adapter": str(folder / f"adapter-{eval_name}"),
        "max_abs_logit_diff": diff,
        "identical_predictions": same,
        "accuracy_trained": acc_expected,
        "accuracy_loaded": acc_loaded,
    }


def run(method: str, seed: int, datas: list[Data], steps: int, run_folder: Path) -> dict[str, Any]:
    """One method through every stage at one seed: the accuracy matrix and the per-stage costs."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model, tokenizer = load_model(MODEL, "classification", num_labels=2, seed=seed)
    heads = [make_head(model, d.task.num_labels, seed, i) for i, d in enumerate(datas)]
    T = len(datas)
    R: list[list[float | None]] = [[None] * T for _ in range(T)]
    stages = []
    for s, data in enumerate(datas):
        t0 = time.perf_counter()
        add_stage_adapter(model, method, s, data.task.name, seed)
        use_head(model, heads[s], trainable=True)
        loss, adapter_params, head_params = train_stage(model, tokenizer, data, heads[s], steps, seed)
        heads[s].requires_grad_(False)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(s + 1):
            use_head(model, heads[i], trainable=False)
            adapter_for_eval(model, method, datas[i].task.name)
            R[s][i] = accuracy(model, tokenizer, datas[i])
        eval_seconds = time.perf_counter() - t1
        names = body_adapters(method, [d.task.name for d in datas[: s + 1]])
        record = {
            "stage": s,
            "task": data.task.name,
            "train_loss": round(loss, 4),
            "trainable_adapter_parameters": adapter_params,
            "trainable_head_parameters": head_params,
            "stored_bytes": stored_bytes(model, names),
            "head_bytes": sum(p.numel() * p.element_size() for h in heads[: s + 1] for p in h.parameters()),
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "accuracy": R[s][: s + 1],
        }
        if method in CONTINUAL:
            record["task_names"] = list(dt.continual.task_names(model, name=CONTINUAL_NAME))
        stages.append(record)
        shown = " ".join(f"{datas[i].task.name}={R[s][i]:.1f}" for i in range(s + 1))
        print(
            f"{method} seed {seed} stage {s + 1}/{T} ({data.task.name}): loss {loss:.3f}, {shown} "
            f"({train_seconds:.0f}s train, {eval_seconds:.0f}s eval)",
            flush=True,
        )
    final = [float(R[T - 1][i]) for i in range(T)]  # type: ignore[arg-type]
    diagonal = [float(R[i][i]) for i in range(T)]  # type: ignore[arg-type]
    result = {
        "method": method,
        "label": LABELS[method],
        "seed": seed,
        "steps": steps,
        "tasks": [d.task.name for d in datas],
        "eval_examples": [len(d.eval) for d in datas],
        "R": R,
        "final_accuracy": final,
        "average_accuracy": sum(final) / T,
        "bwt": sum(final[i] - diagonal[i] for i in range(T - 1)) / (T - 1),
        "stored_bytes": stages[-1]["stored_bytes"],
        "stages": stages,
    }
    result["load_check"] = save_and_check(model, tokenizer, method, heads, datas, run_folder, seed, final[0])
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    return result


# -- aggregation and outputs ---------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    mean = sum(values) / len(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        T = len(mine[0]["tasks"])
        matrix = [
            [statistics.fmean(r["R"][s][i] for r in mine) if i <= s else None for i in range(T)]
            for s in range(T)
        ]
        avg, avg_sd = mean_std([r["average_accuracy"] for r in mine])
        bwt, bwt_sd = mean_std([r["bwt"] for r in mine])
        finals = [mean_std([r["final_accuracy"][i] for r in mine]) for i in range(T)]
        out[method] = {
            "label": LABELS[method],
            "seeds": [r["seed"] for r in mine],
            "tasks": mine[0]["tasks"],
            "R_mean": matrix,
            "average_accuracy": {"mean": avg, "std": avg_sd},
            "bwt": {"mean": bwt, "std": bwt_sd},
            "final_accuracy": [{"mean": m, "std": sd} for m, sd in finals],
            "stored_bytes": statistics.fmean(r["stored_bytes"] for r in mine),
            "train_seconds": statistics.fmean(sum(s["train_seconds"] for s in r["stages"]) for r in mine),
        }
    return out


def pm(mean: float, std: float, sign: str = "") -> str:
    shown = f"{mean:{sign}.1f}"
    return shown if math.isnan(std) else f"{shown} ± {std:.1f}"


def markdown(aggregates: dict[str, Any], command: str, steps: int) -> str:
    tasks = next(iter(aggregates.values()))["tasks"]
    seeds = sorted({s for a in aggregates.values() for s in a["seeds"]})
    lines = [
        f"Continual learning on MiniLM, {' -> '.join(tasks)}, {steps} steps per task, "
        f"one head per task; accuracy in %, mean ± sample std over seeds {', '.join(map(str, seeds))}. "
        "Average accuracy: the mean over tasks after the last stage; BWT: the mean change of each "
        "earlier task's accuracy between the end of its own stage and the end (negative: forgetting). "
        "Stored bytes: the body adapter(s), heads apart; train s: the training seconds of all stages "
        f"(mean over seeds; a shared machine's, rough). Made by `{command}`.",
        "",
        "| method | avg accuracy | BWT | "
        + " | ".join(f"final {t}" for t in tasks)
        + " | stored bytes | train s |",
        "|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|",
    ]
    for agg in aggregates.values():
        cells = [
            agg["label"],
            pm(agg["average_accuracy"]["mean"], agg["average_accuracy"]["std"]),
            pm(agg["bwt"]["mean"], agg["bwt"]["std"], sign="+"),
            *(pm(f["mean"], f["std"]) for f in agg["final_accuracy"]),
            f"{agg['stored_bytes']:,.0f}",
            f"{agg['train_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_heatmap(ax: Any, agg: dict[str, Any], ylabel: bool = True) -> Any:
    import numpy as np

    tasks = agg["tasks"]
    matrix = np.array([[math.nan if v is None else v for v in row] for row in agg["R_mean"]], dtype=float).T
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0, vmax=100)
    for i in range(matrix.shape[0]):
        for s in range(matrix.shape[1]):
            if not math.isnan(matrix[i, s]):
                color = "black" if matrix[i, s] > 60 else "white"
                ax.text(s, i, f"{matrix[i, s]:.1f}", ha="center", va="center", color=color, fontsize=10)
    ax.set_xticks(range(len(tasks)), [f"after {t}" for t in tasks])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("stage")
    if ylabel:
        ax.set_ylabel("task evaluated")
    avg, bwt = agg["average_accuracy"]["mean"], agg["bwt"]["mean"]
    ax.set_title(f"{agg['label']}\navg {avg:.1f}, BWT {bwt:+.1f}", fontsize=10)
    return image


def plots(aggregates: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for method, agg in aggregates.items():
        fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=110)
        image = draw_heatmap(ax, agg)
        fig.colorbar(image, ax=ax, label="accuracy (%)")
        fig.tight_layout()
        fig.savefig(out / f"heatmap-{method}.png")
        plt.close(fig)
    n = len(aggregates)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 1.2, 5.2), dpi=110, squeeze=False, layout="constrained")
    image = None
    for k, (ax, agg) in enumerate(zip(axes[0], aggregates.values(), strict=True)):
        image = draw_heatmap(ax, agg, ylabel=k == 0)
    fig.colorbar(image, ax=list(axes[0]), label="accuracy (%)", shrink=0.8)
    fig.savefig(out / "heatmaps.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per stage (task)")
    parser.add_argument(
        "--eval-limit", type=int, help="cap every eval split at this many examples (smoke runs)"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continual"))
    parser.add_argument("--reuse", action="store_true", help="skip (method, seed) runs whose JSON exists")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    datas = load_data(args.eval_limit)
    print(
        "tasks: " + ", ".join(f"{d.task.name} ({len(d.train)} train, {len(d.eval)} eval)" for d in datas),
        flush=True,
    )
    runs = []
    for method in args.methods:
        for seed in args.seeds:
            path = out / "runs" / f"{method}-seed{seed}.json"
            if args.reuse and path.exists():
                reused = json.loads(path.read_text())
                if (reused["steps"], reused.get("eval_limit")) != (args.steps, args.eval_limit):
                    raise SystemExit(
                        f"--reuse: {path} was run with --steps {reused['steps']} and --eval-limit "
                        f"{reused.get('eval_limit')}, not {args.steps} and {args.eval_limit}; drop --reuse "
                        "or choose another --out"
                    )
                print(f"{method} seed {seed}: reusing {path}", flush=True)
                runs.append(reused)
                continue
            result = run(method, seed, datas, args.steps, out / "runs" / f"{method}-seed{seed}")
            result["eval_limit"] = args.eval_limit
            path.write_text(json.dumps(result, indent=1))
            runs.append(result)
            print(
                f"{method} seed {seed}: avg accuracy {result['average_accuracy']:.2f}, "
                f"BWT {result['bwt']:+.2f}, "
                f"load check max logit diff {result['load_check']['max_abs_logit_diff']:.2g} "
                f"({result['wall_seconds']:.0f}s)",
                flush=True,
            )
    aggregates = aggregate(runs)
    command = "python benchmarks/continual.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.json").write_text(
        json.dumps({"command": command.strip(), "aggregates": aggregates, "runs": runs}, indent=1)
    )
    (out / "results.md").write_text(markdown(aggregates, command.strip(), args.steps))
    plots(aggregates, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
