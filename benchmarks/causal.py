"""The causal-LM suite of ``compare.py --preset causal``: SmolLM2-135M-Instruct on GSM8K as chat data.

``prepare(out)`` writes the data the way a user brings theirs (the data path of ``deltatune train
--data``): ``train.jsonl``, every GSM8K training problem as a conversation (user: the question;
assistant: the worked answer ending in ``#### N``), and ``test.jsonl``, a fixed sample of the test
problems in the same form (the first ``TEST`` of a shuffle seeded 0). A run reports the held-out loss
on all of them and the final-answer accuracy of greedy answers to the first ``--eval-generate``.

``measure(result, run_dir)`` adds forgetting, as PEFT's method comparison measures it: the rise of the
mean token loss on text the model saw before fine-tuning. SmolLM2's pre-training corpus is not here; the
stand-in is ``SEEN`` AG News articles (news wire of 2004-2005, the kind of web text such corpora hold),
scored with the base and again with the trained adapter active.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

TEST = 32  # held-out GSM8K test problems (loss on all, answers on the first --eval-generate)
SEEN = 32  # AG News articles for forgetting
_BASE_LOSS: dict[str, float] = {}  # the base's loss on SEEN, per model (computed once per process)


def _conversation(problem: dict[str, str]) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": problem["question"]},
            {"role": "assistant", "content": problem["answer"]},
        ]
    }


def prepare(out: Path) -> dict[str, str]:
    """Write ``out/data/train.jsonl`` and ``test.jsonl``; return the paths for the budget."""
    from deltatune.train.data import data_root

    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    source = data_root() / "gsm8k"
    train = [json.loads(line) for line in (source / "train.jsonl").read_text().splitlines() if line.strip()]
    test = [json.loads(line) for line in (source / "test.jsonl").read_text().splitlines() if line.strip()]
    order = list(range(len(test)))
    random.Random(0).shuffle(order)
    paths = {"data": folder / "train.jsonl", "eval_data": folder / "test.jsonl"}
    for path, problems in ((paths["data"], train), (paths["eval_data"], [test[i] for i in order[:TEST]])):
        path.write_text("".join(json.dumps(_conversation(p)) + "\n" for p in problems))
    return {k: str(v) for k, v in paths.items()}


def seen_texts() -> list[str]:
    """The first ``SEEN`` AG News test articles (title and description)."""
    from deltatune.train.tasks import load_split

    return [" ".join(e.texts) for e in load_split("agnews", "eval", limit=SEEN)]


def text_loss(model: Any, tokenizer: Any, texts: list[str], batch: int = 8) -> float:
    """Mean token loss of ``model`` on ``texts`` (each truncated to 128 tokens), in eval mode."""
    import torch

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(
                texts[start : start + batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=128,
            )
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            logits = model(**enc).logits[:, :-1].float()
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((targets != -100).sum())
    return total / count


def measure(result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``forgetting``: the adapted model's loss on the seen text minus the base's (positive: forgot)."""
    import deltatune as dt
    from deltatune.train.models import load_model

    model_name = result["model"]
    texts = seen_texts()
    model, tokenizer = load_model(model_name, "generation")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_name not in _BASE_LOSS:
        _BASE_LOSS[model_name] = text_loss(model, tokenizer, texts)
    dt.load(model, run_dir / "adapter")
    after = text_loss(model, tokenizer, texts)
    before = _BASE_LOSS[model_name]
    return {
        "seen_loss_before": round(before, 4),
        "seen_loss_after": round(after, 4),
        "forgetting": round(after - before, 4),
    }
