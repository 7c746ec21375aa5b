"""Prompt tuning, prefix tuning (and P-tuning v2), P-tuning on tiny transformers models (no downloads).

What the shared invariant suite cannot see: the inputs the body receives (masks, token types,
positions), label alignment, gradients, greedy ``generate()`` with the KV cache against a manual loop
without cache, the collapse of prefix tuning's MLP, the encoder-output storage of P-tuning, and parity
with PEFT given the same weights.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.methods.prompts import virtual
from deltatune.methods.prompts.prompt_tuning import FromText, RandomUniform, SampledVocab

N = 4  # virtual tokens


def bert() -> BertForSequenceClassification:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=40,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertForSequenceClassification(config).eval()


def llama() -> LlamaForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=48,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config).eval()


METHODS: list[Any] = [
    pytest.param(dt.PromptTuning(num_virtual_tokens=N), id="prompt"),
    pytest.param(dt.PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8), id="prefix"),
    pytest.param(dt.PrefixTuning(num_virtual_tokens=N, reparameterize=False), id="prefix-v2"),
    pytest.param(dt.PTuning(num_virtual_tokens=N, encoder_hidden_size=8), id="ptuning-lstm"),
    pytest.param(dt.PTuning(num_virtual_tokens=N, encoder="mlp", encoder_hidden_size=8), id="ptuning-mlp"),
]
VIRTUAL: list[Any] = [METHODS[0], METHODS[3]]  # the methods that prepend input tokens


def batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.ones_like(ids)}


def body_inputs(model: nn.Module, **inputs: Any) -> dict[str, Any]:
    """The keyword arguments the transformer body's own forward receives."""
    seen: dict[str, Any] = {}
    body = dt.attachment_of(model).wrappers[dt.attachment_of(model).info("default").targets[0]].base
    hook = body.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    model(**inputs)
    hook.remove()
    return seen


# -- inputs: masks, token types, positions, labels ----------------------------------------------


@pytest.mark.parametrize("method", VIRTUAL)
def test_virtual_tokens_extend_mask_and_token_types(method: Any) -> None:
    model = bert()
    dt.inject(model, method)
    b = batch()
    seen = body_inputs(model, **b)
    assert seen["input_ids"] is None
    assert seen["inputs_embeds"].shape == (2, N + 5, 16)
    embeds = model.bert.base.embeddings.word_embeddings(b["input_ids"])
    assert torch.equal(seen["inputs_embeds"][:, N:], embeds)  # the real tokens follow the prompt
    assert torch.equal(seen["attention_mask"][:, :N], torch.ones(2, N, dtype=torch.long))
    assert torch.equal(seen["attention_mask"][:, N:], b["attention_mask"])
    assert torch.equal(seen["token_type_ids"][:, :N], torch.zeros(2, N, dtype=torch.long))
    assert torch.equal(seen["token_type_ids"][:, N:], b["token_type_ids"])


def test_prompt_after_cls_keeps_cls_first() -> None:
    model = bert()
    att = dt.inject(model, dt.PromptTuning(num_virtual_tokens=N, insert_at=1))
    prompts = att.layers("default")["bert"].prompts
    b = batch()
    seen = body_inputs(model, **b)
    embeds = model.bert.base.embeddings.word_embeddings(b["input_ids"])
    assert torch.equal(seen["inputs_embeds"][:, 0], embeds[:, 0])  # [CLS] stays where the pooler reads
    assert torch.equal(seen["inputs_embeds"][:, 1 : N + 1], prompts.expand(2, -1, -1))
    assert torch.equal(seen["inputs_embeds"][:, N + 1 :], embeds[:, 1:])
    assert torch.equal(seen["attention_mask"][:, 1 : N + 1], torch.ones(2, N, dtype=torch.long))
    assert torch.equal(seen["attention_mask"][:, N + 1 :], b["attention_mask"][:, 1:])
    assert torch.equal(seen["token_type_ids"][:, 1 : N + 1], torch.zeros(2, N, dtype=torch.long))
    hidden = model.bert(**b).last_hidden_state
    assert hidden.shape == (2, 5, 16)  # the virtual positions are cut again


def test_prompt_after_first_token_generates_like_a_manual_loop() -> None:
    model = llama()
    dt.inject(model, dt.PromptTuning(num_virtual_tokens=N, insert_at=1), seed=1)
    ids = torch.tensor([[3, 4, 5, 6, 2]])
    mask = torch.ones_like(ids)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out, greedy_without_cache(model, ids, mask, 5))


def test_prefix_extends_mask_keeps_positions() -> None:
    model = llama()
    dt.inject(model, dt.PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8))
    b = batch()
    seen = body_inputs(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert seen["attention_mask"].shape == (2, N + 5)
    assert torch.equal(seen["attention_mask"][:, N:], b["attention_mask"])
    assert torch.equal(seen["position_ids"], torch.arange(5).expand(2, 5))  # real tokens keep theirs
    cache = seen[virtual.cache_keyword(model.model.base) or "cache"]
    assert len(cache.layers) == 2 and cache.layers[0].keys.shape == (2, 2, N + 5, 4)  # after the forward


@pytest.mark.parametrize("method", VIRTUAL)
def test_explicit_positions_shift_by_the_prompt(method: Any) -> None:
    model = llama()
    dt.inject(model, method)
    positions = torch.tensor([[0, 1, 2], [0, 0, 1]])
    seen = body_inputs(model, input_ids=torch.tensor([[3, 4, 5], [0, 4, 5]]), position_ids=positions)
    assert torch.equal(seen["position_ids"][:, :N], torch.arange(N).expand(2, N))
    assert torch.equal(seen["position_ids"][:, N:], positions + N)


@pytest.mark.parametrize("method", METHODS)
def test_causal_logits_line_up_with_labels(method: Any) -> None:
    """Logits come back one per real token, so the caller's labels (and the model's own loss) need no
    change: no label is needed for a virtual position (as if it were -100), and the first real
    token is not predicted from the prompt, exactly as without the adapter."""
    model = llama()
    dt.inject(model, method)
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 14, 15]])
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 5, 48)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 48), labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual)


@pytest.mark.parametrize("method", METHODS)
def test_output_changes_and_gradients_reach_only_the_adapter(method: Any) -> None:
    model = bert()
    b = batch()
    base = model(**b).logits
    dt.inject(model, method)
    out = model(**b).logits
    assert out.shape == base.shape and not torch.allclose(out, base)
    out.pow(2).sum().backward()
    trainable = {id(p) for p in dt.trainable_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_padding_does_not_leak_into_real_tokens() -> None:
    """A padded row gives the same outputs on its real tokens as the same row unpadded."""
    for method in (dt.PromptTuning(num_virtual_tokens=N), dt.PrefixTuning(num_virtual_tokens=N)):
        model = llama()
        dt.inject(model, method)
        padded = model(input_ids=torch.tensor([[3, 4, 5, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]]))
        alone = model(input_ids=torch.tensor([[3, 4, 5]]))
        assert torch.allclose(padded.logits[:, :3], alone.logits, atol=1e-5)


# -- generation with the KV cache -----------------------------------------------------------------


def greedy_without_cache(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forwards (no cache), with generate()'s positions for left padding."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_manual_loop(method: Any, use_cache: bool) -> None:
    model = llama()
    dt.inject(model, method, seed=3)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ids = torch.tensor([[0, 0, 7, 8, 9], [3, 4, 5, 6, 2]])  # left-padded, as generate() wants
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            use_cache=use_cache,
        )
    # the cache goes in under the name this transformers release supports, never a deprecated one
    assert not [w for w in seen if "past_key_values" in str(w.message)]
    assert torch.equal(out, greedy_without_cache(model, ids, mask, 6))
    with dt.disabled(model):
        plain = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert not torch.equal(out, plain)  # the adapter is really in the generation


# -- storage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [bert, llama], ids=["bert", "llama"])
def test_save_load_gives_identical_outputs(method: Any, make: Any, tmp_path: Path) -> None:
    model = make()
    dt.inject(model, method, seed=2)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    b = batch()
    inputs = b if make is bert else {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    expected = model(**inputs).logits
    dt.save(model, tmp_path)
    fresh = make()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(**inputs).logits, expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    _, stored = dt.attachment_of(model).closed_form("default")
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == stored


def test_prefix_mlp_collapses_to_the_plain_prefixes(tmp_path: Path) -> None:
    model = llama()
    method = dt.PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8)
    att = dt.inject(model, method)
    layer = att.layers("default")["model"]
    mlp = layer.mlp
    # Training count: P' (n x d) + Linear(d, h) + Linear(h, L*2*d_kv); stored: the prefixes only.
    out = 2 * 2 * 2 * 4  # layers * (key, value) * kv heads * head dim
    assert att.closed_form("default") == (N * 16 + 16 * 8 + 8 + 8 * out + out, 4 * N * out)
    assert sum(p.numel() for p in dt.trainable_parameters(model)) == att.closed_form("default")[0]
    with torch.no_grad():
        expected_prefixes = mlp().clone()
    ids = torch.tensor([[3, 4, 5, 6]])
    expected = model(input_ids=ids).logits
    dt.save(model, tmp_path)
    assert set(load_file(str(tmp_path / "adapter.safetensors"))) == {"model.prefixes"}
    fresh = llama()
    loaded = dt.load(fresh, tmp_path, trainable=True)
    plain = loaded.layers("default")["model"]
    assert plain.mlp is None and torch.equal(plain.prefixes, expected_prefixes)
    assert torch.equal(fresh(input_ids=ids).logits, expected)
    # Loaded trainable, the plain prefixes are what trains (and only they).
    assert [p is plain.prefixes for p in dt.trainable_parameters(fresh)] == [True]
    assert {id(p) for p in fresh.parameters() if p.requires_grad} == {id(plain.prefixes)}


def test_ptuning_stores_the_encoder_output(tmp_path: Path) -> None:
    model = bert()
    att = dt.inject(model, dt.PTuning(num_virtual_tokens=N, encoder_hidden_size=8))
    layer = att.layers("default")["bert"]
    d, h = 16, 8
    lstm = 2 * 4 * h * (d + h + 2) + 2 * 4 * h * (2 * h + h + 2)
    assert att.closed_form("default") == (N * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d), 4 * N * d)
    dt.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert set(tensors) == {"bert.prompts"}
    assert torch.equal(tensors["bert.prompts"], layer.encoder().detach())


# -- initialisers and errors --------------------------------------------------------------------


def test_prompt_initialisers() -> None:
    model = bert()
    vocab = model.bert.embeddings.word_embeddings.weight
    att = dt.inject(model, dt.PromptTuning(num_virtual_tokens=N, init=SampledVocab()), name="a")
    rows = att.layers("a")["bert"].prompts
    assert all(any(torch.equal(r, v) for v in vocab) for r in rows)
    dt.inject(model, dt.PromptTuning(num_virtual_tokens=N, init=RandomUniform(bound=0.25)), name="b")
    assert att.layers("b")["bert"].prompts.abs().max() <= 0.25

    class Tokenizer:
        def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
            return {"input_ids": [len(w) for w in text.split()]}

    init = FromText.from_text("ab abc", Tokenizer())
    assert init.token_ids == (2, 3) and init.text == "ab abc"
    dt.inject(model, dt.PromptTuning(num_virtual_tokens=N, init=init), name="c")
    assert torch.equal(att.layers("c")["bert"].prompts, vocab[[2, 3, 2, 3]])
    with pytest.raises(ValueError, match="more than num_virtual_tokens"):
        dt.inject(model, dt.PromptTuning(num_virtual_tokens=1, init=init), name="d")
    with pytest.raises(ValueError, match=r"RandomUniform.bound must be"):
        RandomUniform(bound=0.0)
    with pytest.raises(ValueError, match=r"FromText.token_ids must be"):
        FromText(token_ids=("a",))  # type: ignore[arg-type]


def test_prefix_on_a_body_without_a_cache_names_its_class() -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    model = DistilBertForSequenceClassification(config)
    with pytest.raises(ValueError, match=r"DistilBertModel\.forward takes no KV cache"):
        dt.inject(model, dt.PrefixTuning(num_virtual_tokens=N, reparameterize=False))
    assert not dt.has_adapters(model)
    dt.inject(model, dt.PromptTuning(num_virtual_tokens=N))  # virtual tokens need no cache
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 2)


def test_a_body_that_ignores_the_prefix_cache_is_an_error() -> None:
    """A model that accepts a cache argument but never reads it would make prefix tuning a silent
    no-op; the forward refuses instead."""
    from transformers import BertModel

    class Forgetful(BertModel):  # type: ignore[misc]
        def forward(  # type: ignore[override]
            self, input_ids: Any = None, attention_mask: Any = None, cache: Any = None, **kwargs: Any
        ) -> Any:
            return super().forward(input_ids=input_ids)

    model = bert()
    model.bert = Forgetful(model.config).eval()
    dt.inject(model, dt.PrefixTuning(num_virtual_tokens=N, reparameterize=False))
    with pytest.raises(RuntimeError, match="Forgetful did not use the prefix cache passed as `cache`"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_targets_must_be_the_body() -> None:
    model = bert()
    with pytest.raises(ValueError, match=r"targets must be the model's transformer body \['bert'\]"):
        dt.inject(model, dt.PromptTuning(), targets=["bert.encoder"])
    with pytest.raises(ValueError, match="has no transformers body"):
        net = nn.Sequential(OrderedDict(block=nn.Sequential(OrderedDict(fc=nn.Linear(4, 4)))))
        dt.inject(net, dt.PrefixTuning(), targets=["block"])
    with pytest.raises(ValueError, match="PrefixTuning.encoder_hidden_size is the MLP's width"):
        dt.PrefixTuning(reparameterize=False, encoder_hidden_size=64)
    assert not dt.has_adapters(model)


def test_two_prompt_adapters_switch_and_unload_restores() -> None:
    model = bert()
    b = batch()
    base = model(**b).logits
    dt.inject(model, dt.PromptTuning(num_virtual_tokens=N), name="a", seed=1)
    out_a = model(**b).logits
    dt.inject(model, dt.PrefixTuning(num_virtual_tokens=N), name="b", seed=2)
    out_b = model(**b).logits
    assert not torch.allclose(out_a, out_b)
    with pytest.raises(ValueError, match="cannot run together"):
        dt.set_active(model, ["a", "b"])
    dt.set_active(model, "a")
    assert torch.equal(model(**b).logits, out_a)
    with pytest.raises(ValueError, match="not mergeable"):
        dt.merge(model)
    body = model.bert.base
    dt.unload(model)
    assert model.bert is body
    assert torch.equal(model(**b).logits, base)


# -- parity with PEFT ---------------------------------------------------------------------------


def test_prompt_tuning_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    for make, task in ((bert, "SEQ_CLS"), (llama, "CAUSAL_LM")):
        ours = make()
        att = dt.inject(ours, dt.PromptTuning(num_virtual_tokens=N))
        prompts = att.layers("default")[att.info("default").targets[0]].prompts
        theirs = peft.get_peft_model(
            make(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N)
        ).eval()
        with torch.no_grad():
            theirs.prompt_encoder["default"].embedding.weight.copy_(prompts)
        b = batch()
        if make is llama:
            b.pop("token_type_ids")
            assert torch.allclose(ours(**b).logits, theirs(**b).logits[:, N:], atol=1e-5)
        else:
            assert torch.allclose(ours(**b).logits, theirs(**b).logits, atol=1e-5)


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_ptuning_matches_peft(encoder: str) -> None:
    peft = pytest.importorskip("peft")
    ours = bert()
    att = dt.inject(ours, dt.PTuning(num_virtual_tokens=N, encoder=encoder, encoder_hidden_size=8))
    mine = att.layers("default")["bert"].encoder
    config = peft.PromptEncoderConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=N,
        encoder_hidden_size=8,
        encoder_reparameterization_type=encoder.upper(),
    )
    theirs = peft.get_peft_model(bert(), config).eval()
    state = {"embedding.weight": mine.inputs}
    state.update({f"mlp_head.{k}": v for k, v in mine.head.state_dict().items()})
    if mine.lstm is not None:
        state.update({f"lstm_head.{k}": v for k, v in mine.lstm.state_dict().items()})
    theirs.prompt_encoder["default"].load_state_dict(copy.deepcopy(state), strict=True)
    b = batch()
    assert torch.allclose(ours(**b).logits, theirs(**b).logits, atol=1e-5)


@pytest.mark.parametrize("reparameterize", [True, False], ids=["mlp", "plain"])
def test_prefix_tuning_matches_peft(reparameterize: bool) -> None:
    """Same weights, same logits. PEFT lets BERT count the prefix as past positions (the real tokens'
    absolute positions shift by n); we keep the base model's positions, so the comparison passes
    PEFT's positions explicitly."""
    peft = pytest.importorskip("peft")
    ours = bert()
    kw: dict[str, Any] = {"encoder_hidden_size": 8} if reparameterize else {"reparameterize": False}
    layer = dt.inject(ours, dt.PrefixTuning(num_virtual_tokens=N, **kw)).layers("default")["bert"]
    config = peft.PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=N, prefix_projection=reparameterize, encoder_hidden_size=8
    )
    theirs = peft.get_peft_model(bert(), config).eval()
    encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        if reparameterize:
            mlp = layer.mlp
            encoder.embedding.weight.copy_(mlp.seed)
            encoder.transform[0].weight.copy_(mlp.w1)
            encoder.transform[0].bias.copy_(mlp.b1)
            encoder.transform[2].weight.copy_(mlp.w2)
            encoder.transform[2].bias.copy_(mlp.b2)
        else:
            encoder.embedding.weight.copy_(layer.prefixes)
    b = batch()
    shifted = torch.arange(N, N + 5).expand(2, 5)
    reference = peft_prefix_logits(theirs, b)
    assert torch.allclose(ours(**b, position_ids=shifted).logits, reference, atol=1e-5)
    assert not torch.allclose(ours(**b).logits, reference, atol=1e-5)  # positions differ


def peft_prefix_logits(peft_model: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """PEFT's prefix-tuning logits for a BERT classifier. Where PEFT's own forward refuses the
    installed transformers (PEFT <= 0.21.2 looks for a `past_key_values` argument, which BERT calls
    `cache` from transformers 5.24 on), run the path PEFT's forward takes for a classifier by hand:
    its prefixes (`get_prompt`) as the backbone's cache, a mask with n leading ones, the pooled
    output into the classifier."""
    try:
        logits: torch.Tensor = peft_model(**b).logits
        return logits
    except ValueError as err:
        if "does not support past key values" not in str(err):
            raise
    model = peft_model.base_model
    cache = peft_model.get_prompt(batch_size=b["input_ids"].shape[0])
    mask = torch.cat([torch.ones(b["attention_mask"].shape[0], N, dtype=torch.long), b["attention_mask"]], 1)
    keyword = virtual.cache_keyword(model.bert)
    assert keyword is not None
    out = model.bert(
        input_ids=b["input_ids"], attention_mask=mask, token_type_ids=b["token_type_ids"], **{keyword: cache}
    )
    assert cache.get_seq_length() == N + b["input_ids"].shape[1]  # the backbone read the prefix
    logits = model.classifier(model.dropout(out.pooler_output))
    return logits


def test_prefix_of_cached_tokens_equals_prepending_them() -> None:
    """Exactness of the cache handling on a causal LM: with the keys and values that the frozen model
    itself computes for n real tokens P, prefix tuning gives the logits of running [P; x]."""
    model = llama()
    prefix_ids = torch.tensor([[7, 8, 9, 10]])
    x = torch.tensor([[3, 4, 5], [11, 12, 13]])
    with torch.no_grad():
        out = model(input_ids=prefix_ids, use_cache=True)
        cache = getattr(out, virtual.cache_keyword(model.model) or "cache")
        full = model(input_ids=torch.cat([prefix_ids.expand(2, -1), x], dim=1)).logits[:, N:]
    att = dt.inject(model, dt.PrefixTuning(num_virtual_tokens=N, reparameterize=False))
    layer = att.layers("default")["model"]
    per_layer = [
        torch.stack([c.keys[0].transpose(0, 1), c.values[0].transpose(0, 1)], 1) for c in cache.layers
    ]
    with torch.no_grad():
        layer.prefixes.copy_(torch.stack(per_layer, 1).reshape(N, -1))  # (n, L, 2, H, d) flattened
        ours = model(input_ids=x, position_ids=torch.arange(N, N + 3).expand(2, 3)).logits
    assert torch.allclose(ours, full, atol=1e-5)
