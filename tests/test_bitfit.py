"""BitFit: only biases move; merged bias = b + Δb; bias-less models are refused; the small variant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.selective.bitfit import BitFitLayer
from test_anatomy import INTER, LAYERS, W, tiny_bert, tiny_gpt2, tiny_llama


def test_merged_bias_is_b_plus_delta() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    net = nn.Sequential(lin)
    b = lin.bias.detach().clone()
    w = lin.weight.detach().clone()
    dt.inject(net, dt.BitFit(), targets=["0"])
    layer = dt.attachment_of(net).layers("default")["0"]
    assert isinstance(layer, BitFitLayer)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(5.0))
    x = torch.randn(3, 6)
    adapted = net(x)
    assert torch.allclose(adapted, x @ w.T + b + torch.arange(5.0))
    merged = dt.merge(net)
    assert torch.equal(merged[0].bias, b + torch.arange(5.0))
    assert torch.equal(merged[0].weight, w)
    assert torch.equal(lin.bias, b)  # the original module is untouched
    assert torch.allclose(merged(x), adapted)


def test_training_moves_only_biases() -> None:
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    att = dt.inject(model, dt.BitFit())
    targets = att.info("default").targets
    # Every linear layer of every block: q, k, v, attention output, FFN in, FFN out.
    assert len(targets) == 6 * LAYERS
    assert att.closed_form("default")[0] == LAYERS * (4 * W + INTER + W)
    ids = torch.randint(1, 100, (4, 6))
    opt = torch.optim.SGD(dt.trainable_parameters(model), lr=0.5)
    for _ in range(2):
        model(input_ids=ids).logits.pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    merged = dt.merge(model).state_dict()
    changed = {k for k, v in merged.items() if not torch.equal(v, before[k])}
    assert changed == {f"{t}.bias" for t in targets}


def test_small_variant_query_and_ffn_input() -> None:
    att = dt.inject(tiny_bert(), dt.BitFit(subset="query_ffn"))
    expected = [
        f"bert.encoder.layer.{i}.{name}"
        for i in range(LAYERS)
        for name in ("attention.self.query", "intermediate.dense")
    ]
    assert list(att.info("default").targets) == expected
    assert att.closed_form("default") == (LAYERS * (W + INTER), 4 * LAYERS * (W + INTER))
    with pytest.raises(ValueError, match=r"BitFit.subset='query_ffn'.*attention.output.dense"):
        dt.inject(tiny_bert(), dt.BitFit(subset="query_ffn"), targets=["attention.output.dense"])


def test_gpt2_conv1d_biases() -> None:
    model = tiny_gpt2()
    att = dt.inject(model, dt.BitFit())
    assert len(att.info("default").targets) == 4 * LAYERS  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    layer = att.layers("default")["transformer.h.0.attn.c_attn"]
    assert layer.bias.shape == (3 * W,)


def test_bias_less_llama_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"BitFit: no targeted linear layer of LlamaForCausalLM has a bias"):
        dt.inject(tiny_llama(), dt.BitFit())
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"BitFit: 'model.layers.0.self_attn.q_proj' \(Linear\) has no bias"):
        dt.inject(model, dt.BitFit(), targets=["model.layers.0.self_attn.q_proj"])
    assert not dt.has_adapters(model)


def test_peft_bias_all_trains_the_same_biases() -> None:
    """PEFT's closest option, LoRA with ``bias="all"``, unfreezes every bias; among the blocks' linear
    layers (LayerNorm biases left aside) it trains exactly the biases BitFit targets."""
    peft = pytest.importorskip("peft")
    ours = set(dt.inject(tiny_bert(), dt.BitFit()).info("default").targets)
    theirs_model = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(r=1, target_modules=["query"], bias="all")
    )
    theirs = {
        n.removeprefix("base_model.model.").removesuffix(".bias").replace(".base_layer", "")
        for n, p in theirs_model.named_parameters()
        if p.requires_grad and n.endswith(".bias") and ".encoder.layer." in n and "LayerNorm" not in n
    }
    assert theirs == ours
