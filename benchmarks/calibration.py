"""CorDA's calibration for ``compare.py --preset tuned``: input covariances of MiniLM's query and value
projections over SST-2 training examples (CorDA's "instruction-previewed" mode, ``ipm``, orients the
adapter by what the task's inputs excite).

``prepare(out)`` writes ``out/covariance.safetensors`` (not committed: ``.gitignore``) from the first
``EXAMPLES`` SST-2 training examples, batches of 16 at most 64 tokens, and returns no budget change.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLES = 256
COVARIANCE = "benchmarks/results/tuned/covariance.safetensors"  # (relative to the repository: rows name it)


def prepare(out: Path) -> dict[str, str]:
    import deltatune as dt
    from deltatune.train.batches import Collator
    from deltatune.train.models import load_model
    from deltatune.train.tasks import get_task, load_split

    path = Path(__file__).resolve().parents[1] / COVARIANCE
    if path.exists():
        return {}
    task = get_task("sst2")
    model, tokenizer = load_model("minilm", task.kind, task.num_labels)
    collate = Collator(task, tokenizer, 64)
    examples = list(load_split(task, "train")[:EXAMPLES])
    batches = [
        {k: v for k, v in collate(examples[i : i + 16]).items() if k in ("input_ids", "attention_mask")}
        for i in range(0, len(examples), 16)
    ]
    targets = [p for p, _ in model.named_modules() if p.rsplit(".", 1)[-1] in ("query", "value")]
    path.parent.mkdir(parents=True, exist_ok=True)
    dt.collect_covariance(model, batches, targets, path=path)
    return {}
