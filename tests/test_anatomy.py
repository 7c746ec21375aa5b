"""deltatune.anatomy on tiny randomly initialised transformers models (built from configs, no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune import anatomy
from deltatune.anatomy import Anatomy, describe, find

W, INTER, LAYERS, HEADS = 32, 64, 3, 4


def bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=100,
        hidden_size=W,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        max_position_embeddings=64,
    )


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config()).eval()


def tiny_roberta() -> nn.Module:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=100,
        hidden_size=W,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTER,
        max_position_embeddings=64,
    )
    return RobertaForSequenceClassification(config).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=W, n_layer=LAYERS, n_head=HEADS, n_positions=64, n_inner=INTER)
    return GPT2LMHeadModel(config).eval()


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=100,
        hidden_size=W,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


@pytest.mark.parametrize(
    ("build", "body", "attention_output", "ffn_output", "kind"),
    [
        (tiny_bert, "bert", "attention.output.dense", "output.dense", nn.Linear),
        (tiny_roberta, "roberta", "attention.output.dense", "output.dense", nn.Linear),
        (tiny_gpt2, "transformer", "attn.c_proj", "mlp.c_proj", Conv1D),
        (tiny_llama, "model", "self_attn.o_proj", "mlp.down_proj", nn.Linear),
    ],
)
def test_known_models(build: object, body: str, attention_output: str, ffn_output: str, kind: type) -> None:
    model = build()  # type: ignore[operator]
    parts = describe(model)
    assert parts.body == body
    assert parts.num_layers == LAYERS
    assert parts.hidden_size == W
    assert parts.num_heads == HEADS
    assert parts.head_dim == W // HEADS
    emb = model.get_submodule(parts.embeddings)
    assert isinstance(emb, nn.Embedding) and emb is model.get_input_embeddings()
    blocks = [model.get_submodule(b) for b in parts.blocks]
    assert len({id(b) for b in blocks}) == LAYERS
    assert parts.paths("attention_output") == [f"{b}.{attention_output}" for b in parts.blocks]
    assert parts.paths("ffn_output", layers=(1,)) == [f"{parts.blocks[1]}.{ffn_output}"]
    for path in parts.paths("attention_output", "ffn_output", "ffn_input", "query"):
        assert isinstance(model.get_submodule(path), kind), path
    # The FFN output projection maps the intermediate width back to the model width.
    ffn_out = model.get_submodule(parts.paths("ffn_output")[0])
    assert dt.targets.shape_of(ffn_out) == (INTER, W)


def test_grouped_query_heads_and_two_ffn_inputs_on_llama() -> None:
    parts = describe(tiny_llama())
    assert parts.num_kv_heads == 2
    assert parts.paths("ffn_input", layers=(0,)) == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    ]
    assert parts.paths("ffn") == [f"model.layers.{i}.mlp" for i in range(LAYERS)]


def test_bare_models_and_structure_fallback() -> None:
    assert describe(BertModel(bert_config())).body == ""
    assert describe(LlamaModel(llama_config())).blocks[0] == "layers.0"

    class Wrapper(nn.Module):  # no config, unknown class: found by structure
        def __init__(self) -> None:
            super().__init__()
            self.backbone = LlamaModel(llama_config())

    parts = describe(Wrapper())
    assert parts.body == "backbone"
    assert parts.num_heads is None  # no config says so
    assert find(Wrapper()) is anatomy.KNOWN["llama"]


def test_no_ffn_module_on_bert_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"has no 'ffn' \(Anatomy.ffn is None\)"):
        describe(tiny_bert()).paths("ffn")
    with pytest.raises(ValueError, match="unknown anatomy part 'mlp'"):
        describe(tiny_bert()).paths("mlp")
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        describe(tiny_bert()).paths("ffn_output", layers=(7,))


class MyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)


class MyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 8)
        self.stack = nn.ModuleList([MyBlock() for _ in range(3)])


MINE = Anatomy(embeddings="tok", blocks="stack", attention_output="mix", ffn_input=("up",), ffn_output="down")


def test_unknown_model_names_its_class() -> None:
    with pytest.raises(ValueError, match="MyNet"):
        describe(MyNet())


def test_user_described_model_and_register() -> None:
    parts = describe(MyNet(), MINE)
    assert parts.paths("attention_output") == ["stack.0.mix", "stack.1.mix", "stack.2.mix"]
    assert parts.hidden_size == 8
    anatomy.register("MyNet", MINE)
    try:
        assert find(MyNet()) is MINE
        # Methods that place themselves by anatomy now work on the user's model.
        att = dt.inject(MyNet(), dt.Adapter(placement="pfeiffer", bottleneck=2))
        assert att.info("default").targets == ("stack.0.down", "stack.1.down", "stack.2.down")
    finally:
        del anatomy.KNOWN["MyNet"]


def test_wrong_description_names_the_missing_path() -> None:
    wrong = Anatomy(
        embeddings="tok", blocks="stack", attention_output="attn", ffn_input=("up",), ffn_output="down"
    )
    with pytest.raises(ValueError, match="MyNet does not fit.*Anatomy.attention_output='attn'"):
        describe(MyNet(), wrong)
    with pytest.raises(ValueError, match="Anatomy.blocks='layers'"):
        describe(MyNet(), Anatomy(embeddings="tok", blocks="layers", attention_output="mix",
                                  ffn_input=("up",), ffn_output="down"))  # fmt: skip
    with pytest.raises(ValueError, match="Anatomy.ffn_input must be"):
        Anatomy(embeddings="tok", blocks="stack", attention_output="mix", ffn_input="up", ffn_output="down")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Anatomy.num_heads must be"):
        Anatomy(
            embeddings="t", blocks="s", attention_output="m", ffn_input=("u",), ffn_output="d", num_heads=0
        )


def test_sees_through_adapters() -> None:
    model = tiny_bert()
    before = describe(model)
    dt.inject(model, dt.LoRA(rank=2), targets=["query", "value", "attention.output.dense"])
    after = describe(model)
    assert after == before
    listed = dict(anatomy.named_modules(model))
    path = before.paths("attention_output")[0]
    assert isinstance(listed[path], nn.Linear)  # the original module, not its wrapper
    assert not any(".adapters." in p or p.endswith(".base") for p in listed)
