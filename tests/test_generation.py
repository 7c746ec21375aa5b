"""Causal-LM tasks in the harness (E2E, GSM8K) on a tiny random Llama with a byte-level tokenizer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from deltatune.train.data import DEFAULT_DATA_DIR, Example
from deltatune.train.loop import Collator, TrainConfig, prompt_of, train
from deltatune.train.tasks import TASKS
from tiny_chat import save_tiny_chat_llama

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
if not (DEFAULT_DATA_DIR / "gsm8k").is_dir():
    pytest.skip("the shared datasets are not beside the repository", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_chat_llama(tmp_path_factory.mktemp("tiny-llama"), chat_template=None)


def test_collator_trains_on_the_target_only(tiny_llama: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    example = Example(texts=("What is 2+3?",), target="2+3=5 #### 5", refs=("2+3=5 #### 5",))
    batch = Collator(TASKS["gsm8k"], tok, max_length=256)([example, Example(texts=("1?",), target="1")])
    prompt = tok(prompt_of(TASKS["gsm8k"], example), add_special_tokens=False)["input_ids"]
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    assert (labels[: len(prompt)] == -100).all()
    target = labels[labels != -100]
    assert tok.decode(target[:-1]) == " 2+3=5 #### 5" and int(target[-1]) == tok.eos_token_id
    assert torch.equal(ids[len(prompt) : len(prompt) + len(target)], target)
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # right padding


@pytest.mark.parametrize(
    ("task", "metrics"),
    [
        ("gsm8k", {"loss", "perplexity", "answer_accuracy"}),
        ("e2e", {"loss", "perplexity", "bleu", "rouge_l"}),
    ],
)
def test_generation_task_trains_and_evaluates(
    tiny_llama: str, tmp_path: Path, task: str, metrics: set[str]
) -> None:
    cfg = TrainConfig(
        model=tiny_llama,
        task=task,
        method="lora",
        method_fields={"rank": 4, "alpha": 8},
        targets=["all-linear"],
        steps=20,
        batch_size=4,
        train_limit=4,
        eval_limit=3,
        max_length=160,
        max_new_tokens=6,
        lr=3e-2,
        checkpoint_every=0,
        out=str(tmp_path),
        eval_before=True,
    )
    record = train(cfg, progress=False)
    assert set(record["metrics"]) == metrics
    assert set(record["before"]) == metrics
    losses = [loss for _, loss in record["history"]["loss"]]
    assert all(math.isfinite(v) for v in losses)
    # Four examples seen 20 times: the adapter learns them (a random 2-layer model learns slowly).
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    # every projection of both blocks: q, o (32->32), k, v (32->16, grouped-query), gate, up (32->64), down
    per_block = 2 * (32 + 32) + 2 * (32 + 16) + 2 * (32 + 64) + (64 + 32)
    assert record["trainable_parameters"] == 4 * 2 * per_block


def test_long_prompts_lose_their_start_not_the_target(tiny_llama: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    example = Example(texts=("x" * 300,), target="the answer", refs=("the answer",))
    batch = Collator(TASKS["gsm8k"], tok, max_length=64)([example])
    assert batch["input_ids"].shape[1] == 64
    target = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.decode(target[:-1]) == " the answer"
    assert tok.decode(batch["input_ids"][0][: -len(target)]).endswith("\nAnswer:")
