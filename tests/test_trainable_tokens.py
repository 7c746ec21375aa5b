"""TrainableTokens: only the rows of some tokens train, in the embedding and the head (tied or not)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 3, 5, 7, 3, 9], [5, 5, 2, 8, 60, 3]])
TOKENS = (3, 5, 60)


def tiny(tied: bool, seed: int = 0) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(ids).logits
        return out


def randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))


def written(base: nn.Module, model: nn.Module, name: str = "default") -> nn.Module:
    """``base`` with the adapter's rows written into its weights by hand (the reference)."""
    ref = copy.deepcopy(base)
    att = dt.attachment_of(model)
    shared = att.shared(name)
    ids = torch.tensor(TOKENS)
    with torch.no_grad():
        for path, layer in att.layers(name).items():
            ref.get_submodule(path).weight[ids] = getattr(shared, layer.key)
    return ref


@pytest.mark.parametrize("tied", [True, False])
def test_only_the_rows_train_and_merge_writes_them(tied: bool) -> None:
    base = tiny(tied)
    model = copy.deepcopy(base)
    att = dt.inject(model, dt.TrainableTokens(token_ids=TOKENS))
    assert att.info("default").targets == ("model.embed_tokens", "lm_head")
    rows = 1 if tied else 2  # a tied pair shares one set of rows
    assert [tuple(p.shape) for p in dt.trainable_parameters(model)] == [(3, 16)] * rows
    assert att.closed_form("default") == (rows * 3 * 16, rows * 3 * 16 * 4)
    assert torch.equal(logits(model), logits(base))  # the rows start as the weights' own
    randomise(model)
    out = logits(model)
    assert not torch.allclose(out, logits(base), atol=1e-3)
    assert torch.allclose(out, logits(written(base, model)), atol=1e-5)
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dt.trainable_parameters(model))
    assert all(p.grad is None for p in base.parameters())
    merged = dt.merge(copy.deepcopy(model))
    assert not dt.has_adapters(merged)
    assert torch.allclose(logits(merged), out, atol=1e-5)
    assert torch.equal(logits(dt.unload(model)), logits(base))


def test_rows_of_tokens_absent_from_the_batch_get_a_zero_gradient() -> None:
    model = tiny(True)
    dt.inject(model, dt.TrainableTokens(token_ids=(40, 41)))
    ids = torch.tensor([[1, 2, 3]])
    model(ids, labels=ids).loss.backward()
    (rows,) = dt.trainable_parameters(model)
    assert rows.grad is not None  # (DDP needs every parameter in the graph); the head's columns move
    model.zero_grad()
    model.get_input_embeddings()(ids).sum().backward()  # the embedding alone: no listed token, zeros
    assert rows.grad is not None and not rows.grad.any()


def test_save_load_and_composing_with_lora(tmp_path: Path) -> None:
    base = tiny(True)
    model = copy.deepcopy(base)
    dt.inject(model, dt.LoRA(rank=2), targets=["q_proj", "v_proj"], name="lora")
    dt.inject(model, dt.TrainableTokens(token_ids=TOKENS), name="tokens")
    dt.set_active(model, ["lora", "tokens"])
    randomise(model)
    both = logits(model)
    dt.set_active(model, "lora")
    lora_only = logits(model)
    dt.set_active(model, ["lora", "tokens"])
    assert not torch.allclose(both, lora_only, atol=1e-3)
    # the two adapters train together: one optimizer over both
    params = dt.trainable_parameters(model)
    assert len(params) == 2 * 2 + 1  # q and v factors, and the tied rows
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in params)
    expected = logits(written(dt.merge(copy.deepcopy(model), ["lora"]), model, "tokens"))
    assert torch.allclose(both, expected, atol=1e-5)
    dt.save(model, tmp_path / "tokens", "tokens")
    dt.save(model, tmp_path / "lora", "lora")
    fresh = copy.deepcopy(base)
    dt.load(fresh, tmp_path / "lora")
    dt.load(fresh, tmp_path / "tokens", activate=False)
    dt.set_active(fresh, ["lora", "tokens"])
    assert torch.equal(logits(fresh), both)
    stored = (tmp_path / "tokens" / "adapter.safetensors").stat().st_size
    assert stored < 3 * 16 * 4 + 1024  # the rows once (tied), and a header


@pytest.mark.parametrize("tied", [True, False])
def test_peft_trainable_tokens_both_ways(tied: bool, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = tiny(tied)
    config = peft.TrainableTokensConfig(token_indices=list(TOKENS), init_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    dt.import_peft(ours, tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(IDS).logits
    assert not torch.allclose(expected, logits(base), atol=1e-3)
    assert torch.allclose(logits(ours), expected, atol=1e-5)
    dt.export_peft(ours, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.allclose(back(IDS).logits, expected, atol=1e-5)


def test_an_untied_head_exports_with_rows_of_its_own(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = tiny(False)
    model = copy.deepcopy(base)
    dt.inject(model, dt.TrainableTokens(token_ids=TOKENS))
    randomise(model)
    dt.export_peft(model, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["target_modules"] == [
        "lm_head",
        "model.embed_tokens",
    ]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    with torch.no_grad():
        assert torch.allclose(theirs(IDS).logits, logits(model), atol=1e-5)


@pytest.mark.parametrize(
    "token_ids,message",
    [
        ((3, 64), r"token_ids \[64\] are outside the 64 rows of 'model.embed_tokens'"),
        ((3, 3), "distinct token ids"),
        ((), "non-empty tuple"),
        ((-1,), "integers >= 0"),
    ],
)
def test_bad_token_ids_are_refused(token_ids: tuple[int, ...], message: str) -> None:
    model = tiny(True)
    with pytest.raises(ValueError, match=message):
        dt.inject(model, dt.TrainableTokens(token_ids=token_ids))
    assert not dt.has_adapters(model)


def test_sizes_against_modules_to_save_at_smollm2_shape() -> None:
    """The stored bytes of 2 new tokens on SmolLM2-135M's shape (vocabulary 49,152 x 576, tied head):
    trainable tokens against the whole embedding as modules_to_save (what PEFT users did, peft 2898)."""
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.tie_weights()  # (transformers 5.0 leaves a meta model untied until it is)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tokens = dt.inject(copy.deepcopy(model), dt.TrainableTokens(token_ids=(49150, 49151))).closed_form(
        "default"
    )
    assert tokens == (2 * 576, 2 * 576 * 4)
    whole = 49152 * 576 * 4  # the embedding (its tied head the same matrix), float32
    assert whole // tokens[1] == 24576


def test_train_adds_tokens_and_trains_their_rows(tmp_path: Path, capsys: Any) -> None:
    from deltatune.cli.main import main
    from tiny_chat import save_tiny_chat_llama

    folder = save_tiny_chat_llama(tmp_path / "model")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"call {i}"},
                {"role": "assistant", "content": f"<tool>{i}</tool>"},
            ]
        }
        for i in range(12)
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    args = [
        "train",
        "--model",
        folder,
        "--data",
        str(tmp_path / "chat.jsonl"),
        "--method",
        "trainable_tokens",
    ]
    args += ["--add-tokens", "<tool>", "</tool>", "--steps", "2", "--batch-size", "4", "--lr", "0.1"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["extra"]["harness"]["task"]["added_tokens"] == ["<tool>", "</tool>"]
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    vocab = len(tokenizer)
    assert config["config"]["token_ids"] == [vocab, vocab + 1]
    assert config["targets"] == ["model.embed_tokens", "lm_head"]
    # loading needs the grown embeddings, and says so
    with pytest.raises(ValueError, match=r"vocabulary is larger .* resize the embeddings first"):
        dt.load(base, out / "adapter")
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "call 3", "--max-new-tokens", "3"]) == 0
    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == vocab + 2
    assert main([*args, "--trainable-tokens", "<nope>", "--out", str(tmp_path / "bad")]) == 2
    assert "has no token(s) ['<nope>']" in capsys.readouterr().err
    assert (
        main(["train", "--model", folder, "--data", str(tmp_path / "chat.jsonl"), "--trainable-tokens", "x"])
        == 2
    )
    assert "second adapter" in capsys.readouterr().err
