"""Batches by length against plain padded batches, on a length-skewed chat file (issue 25).

A generated chat JSONL whose answer lengths are log-normal (median ``--median-words`` words, spread
``--sigma``: most conversations short, a long tail, as in real chat data) is tokenised once with
SmolLM2-135M-Instruct's chat template; then LoRA (rank 16, every linear layer) trains on it, on
``--model``: ``small`` (default), a 4-layer SmolLM2-shaped Llama with random weights
(``benchmarks/speed.py``'s ``build``; these CPUs take about 30 s per step of 8 long conversations on
the real model), or ``smollm2``, the real 30-layer one:

1. **throughput**, in one process, alternating round by round: ``--steps-per-round`` optimizer steps
   on the batches :func:`~deltatune.train.batches.grouped_positions` picks, then as many on the
   batches plain :func:`~deltatune.train.batches.batch_positions` picks (the same step numbers);
   tokens per second counts the real tokens (not the padding) over a round's steps (a single grouped
   batch is all short or all long, so one step alone says little); the figure is the median of the
   per-round ratios (grouped / plain), because this machine's speed drifts by about ±30 % between runs;
2. **the same training**: two ``deltatune train`` runs of ``--steps`` steps, ``group_by_length``
   true and false, same seed: the held-out loss every quarter of the run (the curve) and at the end.

    .venv/bin/python benchmarks/length_grouping.py --json benchmarks/results/data/length_grouping.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from speed import build

import deltatune as dt
from deltatune.train.batches import Collator, batch_positions, grouped_positions
from deltatune.train.config import TrainConfig
from deltatune.train.loop import step, train
from deltatune.train.models import load_model
from deltatune.train.streaming import StreamedExamples
from deltatune.train.userdata import open_data


def write_skewed(path: Path, n: int, median_words: int, sigma: float, seed: int) -> None:
    """``n`` conversations whose answers are ``median_words`` words long at the median, log-normally
    spread (``sigma``; capped at 600 words): most short, a long tail, as in real chat data."""
    rng = random.Random(seed)
    words = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "by")
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            count = min(600, int(rng.lognormvariate(math.log(median_words), sigma)))
            text = " ".join(rng.choice(words) for _ in range(count))
            answer = f"{text} So {a} + {b} = {a + b}."
            turns = [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")


def model_and_tokenizer(name: str) -> tuple[Any, Any]:
    """The model ``--model`` names, with SmolLM2-135M-Instruct's tokenizer and chat template."""
    model, tokenizer = load_model("smollm2", "generation")
    if name == "small":
        model = build(small=True)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def throughput(args: argparse.Namespace, data_file: Path) -> dict[str, Any]:
    model, tokenizer = model_and_tokenizer(args.model)
    data = open_data(str(data_file), eval_fraction=0.01, seed=0)
    examples = data.examples("train", tokenizer, args.max_length, "assistant")
    assert not isinstance(examples, StreamedExamples)
    lengths = [len(e.tokens[0]) for e in examples if e.tokens is not None]
    dt.inject(model, dt.LoRA(rank=16, alpha=32), targets=["all-linear"], seed=0)
    model.train()
    optimizer = torch.optim.AdamW(dt.trainable_parameters(model), lr=1e-4)
    collate = Collator(data.task, tokenizer, args.max_length)
    pick = {
        "grouped": lambda s: grouped_positions(s, args.batch_size, lengths, seed=0),
        "plain": lambda s: batch_positions(s, args.batch_size, len(examples), seed=0),
    }
    rates: dict[str, list[float]] = {k: [] for k in pick}
    waste: dict[str, list[float]] = {k: [] for k in pick}
    k = args.steps_per_round
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, positions in pick.items():
            real = padded = 0
            seconds = 0.0
            for s in range(r * k, (r + 1) * k):
                batch = collate([examples[i] for i in positions(s)])
                real += int(batch["attention_mask"].sum())
                padded += batch["attention_mask"].numel()
                start = time.perf_counter()
                step(model, [batch], "generation", optimizer)
                seconds += time.perf_counter() - start
            if r:
                rates[name].append(real / seconds)
                waste[name].append(1 - real / padded)
        if r:
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in rates.items()), flush=True)
    ratios = [g / p for g, p in zip(rates["grouped"], rates["plain"], strict=True)]
    return {
        "examples": len(examples),
        "median_ratio": statistics.median(ratios),
        "ratios": ratios,
        "tokens_per_second": {k: statistics.median(v) for k, v in rates.items()},
        "padding_waste": {k: statistics.mean(v) for k, v in waste.items()},
    }


def same_training(args: argparse.Namespace, data_file: Path, folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for grouped in (True, False):
        model, tokenizer = model_and_tokenizer(args.model)
        cfg = TrainConfig(
            model="smollm2",
            data=str(data_file),
            eval_fraction=0.05,
            method="lora",
            method_fields={"rank": 16, "alpha": 32},
            targets=["all-linear"],
            steps=args.steps,
            batch_size=args.batch_size,
            lr=5e-4,
            max_length=args.max_length,
            group_by_length=grouped,
            eval_every=max(1, args.steps // 4),
            checkpoint_every=0,
            out=str(folder / f"grouped-{grouped}"),
        )
        record = train(cfg, progress=False, model=model, tokenizer=tokenizer)
        losses = [loss for _, loss in record["history"]["loss"]]
        half = losses[len(losses) // 2 :]
        out["grouped" if grouped else "plain"] = {
            "heldout_loss": record["metrics"]["loss"],
            "heldout_curve": [[step, m["loss"]] for step, m in record["history"]["eval"]],
            "train_loss_last_half": statistics.mean(half),
            "train_seconds": record["train_seconds"],
            "padding_waste": record["history"]["padding"]["waste"],
        }
        print(f"group_by_length={grouped}: {out['grouped' if grouped else 'plain']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("small", "smollm2"), default="small")
    p.add_argument("--examples", type=int, default=1200)
    p.add_argument("--median-words", type=int, default=30, help="answer length at the median (words)")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of the answer lengths")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps-per-round", type=int, default=6, help="consecutive steps of each side per round")
    p.add_argument("--steps", type=int, default=40, help="steps of each of the two training runs (0: skip)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "skewed.jsonl"
        write_skewed(data_file, args.examples, args.median_words, args.sigma, seed=0)
        result: dict[str, Any] = {"config": vars(args), "throughput": throughput(args, data_file)}
        if args.steps:
            result["training"] = same_training(args, data_file, Path(tmp))
    t = result["throughput"]
    print(
        f"grouped / plain tokens per second: {t['median_ratio']:.2f}x (median of {args.rounds} rounds); "
        f"padding {t['padding_waste']['grouped']:.1%} vs {t['padding_waste']['plain']:.1%}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
