"""From examples to model inputs and a summed loss.

* :func:`batch_positions`: a fixed data order. Step ``s`` uses positions ``[s·G, (s+1)·G)`` of a
  stream of seeded permutations, G being the global batch, so a resumed run sees exactly the batches
  it would have seen, and under ``torchrun`` rank ``r`` of ``W`` takes the ``r``-th slice of each
  global batch.
* :class:`Collator`: tokenised inputs and labels (for causal LMs, the prompt of :func:`prompt_of`
  followed by the target, with the loss on the target only).
* :func:`loss_sum`: a *summed* loss; the caller divides by the global count of examples or target
  tokens (:func:`count_of`), so that the gradient of a W-process run equals that of a 1-process run
  with the same global batch.

Example:
    >>> batch_positions(0, 4, 6, seed=0) + batch_positions(1, 4, 6, seed=0)[:2] == batch_positions(
    ...     0, 6, 6, seed=0
    ... )
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Example
from .tasks import Task

__all__ = [
    "PROMPTS",
    "Collator",
    "autocast",
    "batch_positions",
    "count_of",
    "device_of",
    "grouped_positions",
    "logits_of",
    "loss_of_logits",
    "loss_sum",
    "prompt_of",
    "to_device",
]

# Prompts for causal-LM tasks; the target follows after a space.
PROMPTS: dict[str, str] = {
    "e2e": "Describe the restaurant in one sentence.\nAttributes: {0}\nDescription:",
    "gsm8k": "Question: {0}\nAnswer:",
}


def batch_positions(step: int, global_batch: int, n: int, seed: int) -> list[int]:
    """Example indices of global batch ``step``: consecutive slices of seeded per-epoch permutations."""
    out: list[int] = []
    start = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(global_batch - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
    return out


def grouped_positions(
    step: int, global_batch: int, lengths: Sequence[int], seed: int, window: int = 64
) -> list[int]:
    """:func:`batch_positions` with batches of similar lengths: each epoch's seeded permutation is cut
    into windows of ``window`` global batches, each window sorted by length (longest first) and cut
    into global batches, and the batches of the epoch are shuffled (seeded). Every example is still
    seen once per epoch, and a resumed run sees the same batches; padding shrinks to the spread of
    lengths within a batch (Hugging Face's ``LengthGroupedSampler`` does the same per epoch)."""
    n = len(lengths)
    out: list[int] = []
    start = step * global_batch
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        order = _grouped_epoch(n, global_batch, lengths, seed, epoch, window)
        take = min(global_batch - len(out), n - offset)
        out.extend(order[offset : offset + take])
    return out


_EPOCH_CACHE: dict[tuple[int, int, int, int, int, int], list[int]] = {}


def _grouped_epoch(
    n: int, global_batch: int, lengths: Sequence[int], seed: int, epoch: int, window: int
) -> list[int]:
    key = (id(lengths), n, global_batch, seed, epoch, window)
    cached = _EPOCH_CACHE.get(key)
    if cached is not None:
        return cached
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).numpy()
    sizes = np.asarray(lengths)[perm]
    size = global_batch * window
    ordered = np.concatenate(
        [perm[w : w + size][np.argsort(-sizes[w : w + size], kind="stable")] for w in range(0, n, size)]
    )
    full = n // global_batch
    rng = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
    batches = ordered[: full * global_batch].reshape(full, global_batch)[
        torch.randperm(full, generator=rng).numpy()
    ]
    order = [*batches.reshape(-1).tolist(), *ordered[full * global_batch :].tolist()]
    _EPOCH_CACHE.clear()  # one epoch at a time is all a run reads
    _EPOCH_CACHE[key] = order
    return order


def prompt_of(task: Task, example: Example) -> str:
    """The text a causal LM continues for ``example``: the rendered prompt of a tokenised example, the
    task's prompt template, else the inputs."""
    if example.tokens is not None:
        return example.texts[0]
    template = PROMPTS.get(task.name)
    if template is None:
        return "\n".join(example.texts) + "\n"
    return template.format(*example.texts)


class Collator:
    """Turns examples into model inputs, labels and the count the loss is divided by."""

    def __init__(self, task: Task, tokenizer: Any, max_length: int) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.tokens = 0  # real tokens collated so far (causal batches): with ``padded``, the padding waste
        self.padded = 0  # tokens the model processed: batch rows x their width

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if self.task.kind == "generation":
            batch = self._causal(examples)
            self.tokens += int(batch["attention_mask"].sum())
            self.padded += batch["attention_mask"].numel()
            return batch
        texts = list(zip(*[e.texts for e in examples], strict=True))
        enc = self.tokenizer(
            *[list(t) for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        dtype = torch.float32 if self.task.kind == "regression" else torch.long
        enc["labels"] = torch.tensor([e.label for e in examples], dtype=dtype)
        return dict(enc)

    def _causal(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        rows: list[list[int]] = []
        labels: list[list[int]] = []
        for e in examples:
            if e.tokens is not None:  # the user's data, tokenised and truncated already (userdata)
                rows.append(list(e.tokens[0]))
                labels.append(list(e.tokens[1]))
                continue
            prompt = tok(prompt_of(self.task, e), add_special_tokens=False)["input_ids"]
            target = tok(" " + (e.target or ""), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            # Too long: drop the start of the prompt, never the whole target (the loss would be empty).
            target = target[: self.max_length - 1]
            prompt = prompt[max(0, len(prompt) + len(target) - self.max_length) :]
            rows.append(prompt + target)
            labels.append([-100] * len(prompt) + target)
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            lab[i, : len(lb)] = torch.tensor(lb)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": lab}


def count_of(batch: dict[str, torch.Tensor], kind: str) -> int:
    """What the loss of this batch is a sum over: examples, or predicted target tokens."""
    if kind == "generation":
        return int((batch["labels"][:, 1:] != -100).sum())
    return int(batch["labels"].shape[0])


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Forward ``batch`` and return its summed loss."""
    return loss_of_logits(logits_of(model, batch), batch["labels"], kind)


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for ``batch`` (its ``labels`` are not passed: the loss is ours)."""
    logits: torch.Tensor = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return logits


def loss_of_logits(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed loss (the caller divides by the global count, see the module docstring)."""
    if kind == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    if kind == "regression":
        return F.mse_loss(logits.float().squeeze(-1), labels, reduction="sum")
    shift = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    return F.cross_entropy(shift.reshape(-1, shift.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")


def device_of(model: nn.Module) -> torch.device:
    """Where the model's (first) parameters are; the CPU for a model without any."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch's tensors on ``device`` (the batch itself on the CPU)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(precision: str) -> Any:
    """bf16 autocast on the GPU (else the CPU) for ``precision == "bf16"``; nothing for fp32."""
    if precision == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return nullcontext()
