"""``deltatune generate`` and ``deltatune chat`` (:mod:`deltatune.cli.generate`) on a tiny random chat
Llama with LoRA adapters whose B factors are random, so that each adapter changes the answers.

The answers are checked against a hand-written greedy loop (no cache, no padding, one prompt at a
time) on a model loaded separately, so batching, left padding, routing and streaming are all
compared with the plainest generation there is.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import deltatune as dt
from deltatune.cli.generate import _load, add_parsers, run_chat, run_generate
from deltatune.formats.io import CONFIG_NAME
from deltatune.train.models import load_model
from deltatune.train.provenance import TASK_FIELDS
from deltatune.train.provenance import save as harness_save

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from tiny_chat import CHATML, save_tiny_chat_llama

NEW = 12  # --max-new-tokens in these tests


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_parsers(p.add_subparsers(dest="command"))
    return p


def _args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args([*argv, "--max-new-tokens", str(NEW), "--device", "cpu"])


def _save_adapter(folder: str, out: Path, seed: int, base_model: str | None = None) -> str:
    model, _ = load_model(folder, "generation")
    dt.inject(model, dt.LoRA(rank=4, alpha=8), targets=["all-linear"], seed=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    dt.save(model, out, base_model=base_model or folder)
    return str(out)


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = save_tiny_chat_llama(root / "model")
        self.a = _save_adapter(self.folder, root / "a", seed=3)
        self.b = _save_adapter(self.folder, root / "b", seed=4)
        # The oracle: one model with both adapters, switched by hand.
        self.model, self.tok = load_model(self.folder, "generation")
        dt.load(self.model, self.a, name="a", activate=False)
        dt.load(self.model, self.b, name="b", activate=False)
        self.model.eval()

    def greedy(self, adapter: str | None, messages: list[dict[str, str]], *, raw: bool = False) -> str:
        """The greedy answer by a plain loop: the whole sequence through the model at every step."""
        if raw:
            ids = self.tok(messages[-1]["content"], return_tensors="pt")["input_ids"]
        else:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        new: list[int] = []
        ctx = dt.disabled(self.model) if adapter is None else _active(self.model, adapter)
        with ctx, torch.no_grad():
            for _ in range(NEW):
                token = int(self.model(input_ids=ids).logits[0, -1].argmax())
                new.append(token)
                if token == self.tok.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        text = self.tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return str(text).strip()


@contextlib.contextmanager
def _active(model: Any, name: str) -> Iterator[None]:
    dt.set_active(model, name)
    try:
        yield
    finally:
        dt.set_active(model, [])


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield Setup(tmp_path_factory.mktemp("generate"))


def _jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- generate ----------------------------------------------------------------------------------


def test_generate_is_the_greedy_answer_with_the_adapter(s: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_generate(_args("generate", s.a, "--prompt", "hello")) == 0
    printed = capsys.readouterr().out
    expected = s.greedy("a", _user("hello"))
    assert printed == expected + "\n"
    assert run_generate(_args("generate", s.a, "--prompt", "hello", "--compare-base")) == 0
    (row,) = _jsonl(capsys.readouterr().out)
    assert row["output"] == expected and row["adapter"] == "default" and row["prompt"] == "hello"
    assert row["base_output"] == s.greedy(None, _user("hello"))
    assert row["base_output"] != row["output"]  # the adapter changes the answer


def test_a_mixed_batch_answers_each_prompt_with_its_own_adapter(
    s: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [
        ("hello", "default"),
        ("a much longer prompt, to pad the others", "b"),
        ("hi", "base"),
        ("what now?", None),
        ("and b again", "b"),
    ]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p, "adapter": n}) + "\n" for p, n in jobs))
    argv = ("generate", s.a, "--adapter", f"b={s.b}", "--prompts", str(file), "--batch-size", "4")
    assert run_generate(_args(*argv)) == 0
    rows = _jsonl(capsys.readouterr().out)
    oracle = {"default": "a", "b": "b", "base": None, None: None}
    assert [r["prompt"] for r in rows] == [p for p, _ in jobs]
    assert [r["adapter"] for r in rows] == ["default", "b", "base", "base", "b"]
    for (prompt, name), row in zip(jobs, rows, strict=True):
        assert row["output"] == s.greedy(oracle[name], _user(prompt)), (prompt, name)
    # and each alone, its adapter the positional one (the base: the adapter's "base" prompt alone)
    for positional, record, row in (
        (s.a, {"prompt": jobs[0][0]}, rows[0]),
        (s.b, {"prompt": jobs[1][0]}, rows[1]),
        (s.a, {"prompt": jobs[2][0], "adapter": "base"}, rows[2]),
    ):
        single = tmp_path / "one.jsonl"
        single.write_text(json.dumps(record) + "\n")
        assert run_generate(_args("generate", positional, "--prompts", str(single))) == 0
        assert _jsonl(capsys.readouterr().out)[0]["output"] == row["output"]
    assert len({r["output"] for r in rows[:3]}) == 3


def test_out_writes_the_jsonl_and_system_adds_a_turn(
    s: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "answers" / "out.jsonl"
    argv = ("generate", s.a, "--prompt", "one", "--prompt", "two", "--system", "Be brief.", "--out", str(out))
    assert run_generate(_args(*argv)) == 0
    assert str(out) in capsys.readouterr().out
    rows = _jsonl(out.read_text())
    system = [{"role": "system", "content": "Be brief."}]
    assert [r["output"] for r in rows] == [s.greedy("a", [*system, *_user(p)]) for p in ("one", "two")]
    assert not [p for p in out.parent.iterdir() if p.name != "out.jsonl"]  # no temporary file left


def test_sampling_is_seeded(s: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    answers = []
    for seed in ("1", "1", "2"):
        run_generate(_args("generate", s.a, "--prompt", "hello", "--temperature", "1.5", "--seed", seed))
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] != answers[2]


def test_a_run_folder_and_its_metrics_give_the_model(
    s: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(s.a, run / "adapter")
    config = json.loads((run / "adapter" / CONFIG_NAME).read_text())
    del config["base_model"]
    (run / "adapter" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pass --model"):
        run_generate(_args("generate", str(run), "--prompt", "hello"))
    assert run_generate(_args("generate", str(run), "--prompt", "hello", "--model", s.folder)) == 0
    assert capsys.readouterr().out.strip() == s.greedy("a", _user("hello"))
    (run / "metrics.json").write_text(json.dumps({"config": {"model": s.folder}}))
    assert run_generate(_args("generate", str(run), "--prompt", "hello")) == 0
    assert capsys.readouterr().out.strip() == s.greedy("a", _user("hello"))
    with pytest.raises(ValueError, match="neither an adapter folder"):
        run_generate(_args("generate", str(tmp_path), "--prompt", "hello"))


def test_a_tokenizer_without_a_chat_template(
    s: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = save_tiny_chat_llama(tmp_path / "bare", chat_template=None)  # the same weights, no template
    with pytest.raises(ValueError, match=r"no chat template.*--chat-template FILE.*--raw"):
        run_generate(_args("generate", s.a, "--model", bare, "--prompt", "hello"))
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    assert (
        run_generate(
            _args("generate", s.a, "--model", bare, "--chat-template", str(template), "--prompt", "hello")
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == s.greedy("a", _user("hello"))
    assert run_generate(_args("generate", s.a, "--model", bare, "--raw", "--prompt", "hello")) == 0
    assert capsys.readouterr().out.strip() == s.greedy("a", _user("hello"), raw=True)
    with pytest.raises(ValueError, match="--chat-template FILE") as e:
        run_chat(_args("chat", s.a, "--model", bare), input_fn=lambda _: "/exit", output=io.StringIO())
    assert "--raw" not in str(e.value)  # chat has no --raw


@pytest.mark.skipif(
    "chat_template" not in TASK_FIELDS, reason="adapter configs do not record chat_template yet"
)
def test_the_adapter_records_its_chat_template(
    s: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = save_tiny_chat_llama(tmp_path / "bare", chat_template=None)
    model, _ = load_model(bare, "generation")
    dt.load(model, s.a)
    harness_save(model, tmp_path / "templated", task={"name": "chat", "chat_template": CHATML})
    assert run_generate(_args("generate", str(tmp_path / "templated"), "--prompt", "hello")) == 0
    assert capsys.readouterr().out.strip() == s.greedy("a", _user("hello"))


def test_bad_prompt_files_name_the_line(s: Setup, tmp_path: Path) -> None:
    file = tmp_path / "bad.jsonl"
    cases = {
        '{"prompt": "ok"}\n\n{"prompt": oops}\n': r"bad\.jsonl line 3: not JSON",
        '{"prompt": "ok"}\n{"text": "no prompt"}\n': r'line 2: no "prompt"',
        '{"prompt": "ok", "adapter": "math"}\n': r"line 1: unknown adapter 'math'.*--adapter math=PATH",
        "\n": "no prompts",
    }
    for text, message in cases.items():
        file.write_text(text)
        with pytest.raises(ValueError, match=message):
            run_generate(_args("generate", s.a, "--prompts", str(file)))
    with pytest.raises(ValueError, match="--prompt TEXT"):
        run_generate(_args("generate", s.a))
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        run_generate(_args("generate", s.a, "--adapter", s.b, "--prompt", "x"))
    with pytest.raises(ValueError, match="pick another name"):
        run_generate(_args("generate", s.a, "--adapter", f"base={s.b}", "--prompt", "x"))
    with pytest.raises(ValueError, match="--top-p"):
        run_generate(_args("generate", s.a, "--prompt", "x", "--top-p", "0"))


def test_adapters_of_different_bases_are_refused(s: Setup, tmp_path: Path) -> None:
    other = _save_adapter(s.folder, tmp_path / "other", seed=5, base_model="someone/other-model")
    with pytest.raises(ValueError, match="different base models") as e:
        run_generate(_args("generate", s.a, "--adapter", f"o={other}", "--prompt", "x"))
    assert s.folder in str(e.value) and "someone/other-model" in str(e.value)


# -- chat --------------------------------------------------------------------------------------


def _chat(*argv: str, lines: list[str]) -> tuple[int, str]:
    feed = iter(lines)

    def read(prompt: str) -> str:
        assert prompt == "you> "
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    code = run_chat(_args("chat", *argv), input_fn=read, output=out)
    return code, out.getvalue()


def test_chat_streams_the_answers_and_reset_clears_the_history(s: Setup) -> None:
    code, out = _chat(s.a, lines=["hello", "", "/reset", "again", "/exit", "never read"])
    assert code == 0
    first, fresh = s.greedy("a", _user("hello")), s.greedy("a", _user("again"))
    assert f"assistant> {first}" in out and f"assistant> {fresh}" in out
    assert out.count("assistant> ") == 2 and "cleared" in out
    # without /reset, the second answer sees the first turn
    code, out = _chat(s.a, lines=["hello", "again"])  # and EOF ends it
    history = [*_user("hello"), {"role": "assistant", "content": first}, *_user("again")]
    second = s.greedy("a", history)
    assert code == 0 and f"assistant> {second}" in out and second != fresh


def test_chat_compare_base_prints_both_and_keeps_the_adapters(s: Setup) -> None:
    code, out = _chat(s.a, "--compare-base", "--system", "Be brief.", lines=["hello", "again"])
    system = [{"role": "system", "content": "Be brief."}]
    first = s.greedy("a", [*system, *_user("hello")])
    assert code == 0 and out.count("adapter> ") == 2 and out.count("base> ") == 2
    assert f"adapter> {first}\nbase> {s.greedy(None, [*system, *_user('hello')])}" in out
    history = [*system, *_user("hello"), {"role": "assistant", "content": first}, *_user("again")]
    assert f"adapter> {s.greedy('a', history)}\nbase> {s.greedy(None, history)}" in out


def test_chat_drops_the_oldest_turns(s: Setup, tmp_path: Path) -> None:
    short = tmp_path / "short"
    shutil.copytree(s.folder, short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 140
    (short / "config.json").write_text(json.dumps(config))
    long = "tell me more about " + "x" * 30
    code, out = _chat(s.a, "--model", str(short), lines=[long, long, long, "y" * 200])
    assert code == 0 and "dropped the 1 oldest turn(s)" in out and out.count("assistant> ") == 3
    assert "not sent" in out


def test_a_four_bit_adapter_answers_on_the_base_it_was_trained_on(
    s: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A QLoRA adapter (saved on an NF4 base) answers on the rebuilt 4-bit base by default, on the
    float base with --quantize none; a float adapter answers on a 4-bit base with --quantize nf4."""
    pytest.importorskip("torchao")
    from deltatune.runtime.quant import NF4Linear, quantize

    model, tok = load_model(s.folder, "generation")
    quantize(model)
    dt.inject(model, dt.LoRA(rank=4, alpha=8), targets=["all-linear"], seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    folder = tmp_path / "qlora"
    dt.save(model, folder, base_model=s.folder)

    def oracle(quantized: bool, adapter: str) -> str:
        """The greedy answer of a model built by hand the way the flag says."""
        net, _ = load_model(s.folder, "generation")
        if quantized and adapter == str(folder):
            dt.load(net, adapter, quantize=True)
        else:
            dt.load(net, adapter, quantize=False if adapter == str(folder) else None)
            if quantized:
                quantize(net)
        assert any(isinstance(m, NF4Linear) for m in net.modules()) == quantized
        other = Setup.__new__(Setup)
        other.model, other.tok = net.eval(), tok
        dt.set_active(net, [])
        return other.greedy(next(iter(dt.attachment_of(net).adapters)), _user("hello"))

    answers: list[str] = []
    for argv, quantized, adapter in (
        ((), True, str(folder)),
        (("--quantize", "none"), False, str(folder)),
        (("--quantize", "nf4"), True, s.a),
    ):
        assert run_generate(_args("generate", adapter, "--prompt", "hello", *argv)) == 0
        answers.append(capsys.readouterr().out.strip())
        assert answers[-1] == oracle(quantized, adapter), argv
        # (the tiny model's greedy answer may not change with 4 bits: the loaded model tells)
        loaded, _ = _load(_args("generate", adapter, *argv), {}, raw=False, command="generate")
        assert any(isinstance(m, NF4Linear) for m in loaded.modules()) == quantized, argv
    assert answers[0] != answers[2]
