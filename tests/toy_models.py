"""Tiny models for the invariant suite: no downloads, deterministic weights, each forward < 1 ms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

D = 16


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(2 * D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc2(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """One pre-norm self-attention block with separate q/k/v/o projections (Llama/BERT style)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)
        self.heads = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        b, t, _ = x.shape
        h = self.norm(x)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, D/H)

        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o_proj(a.transpose(1, 2).reshape(b, t, D))


class Blocks(nn.Module):
    """Two attention blocks in a ModuleList, so layer indices mean something."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Attention(), Attention()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, D, padding_idx=0)
        self.norm = nn.LayerNorm(D)
        self.proj = nn.Linear(D, D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (B, T)
        return self.proj(self.norm(self.embed(ids))).mean(dim=1)


class GPT2Style(nn.Module):
    """GPT-2's fused c_attn / c_proj, stored (in, out) as transformers' Conv1D does."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.c_attn = Conv1D(3 * D, D)
        self.c_proj = Conv1D(D, D)
        self.c_fc = Conv1D(2 * D, D)
        self.c_out = Conv1D(D, 2 * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        q, k, v = self.c_attn(self.ln(x)).split(D, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1)
        x = x + self.c_proj(att @ v)
        return x + self.c_out(torch.nn.functional.gelu(self.c_fc(x)))


class TinyLlama(nn.Module):
    """A two-block transformer with Llama's module names (embed_tokens, layers.i.self_attn.o_proj,
    layers.i.mlp.down_proj, ...) and biases everywhere: what deltatune.anatomy recognises by structure."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, D)
        self.layers = nn.ModuleList([LlamaBlock(), LlamaBlock()])
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (B, T)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))  # (B, T, 8)


class LlamaMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(D, 2 * D)
        self.up_proj = nn.Linear(D, 2 * D)
        self.down_proj = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(D)
        self.self_attn = Attention()
        self.post_attention_layernorm = nn.LayerNorm(D)
        self.mlp = LlamaMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(self.input_layernorm(x))  # Attention adds its own residual
        return x + self.mlp(self.post_attention_layernorm(x))


class HFLogits(nn.Module):
    """A tiny randomly initialised transformers model called on token ids, returning its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (B, T)
        logits: torch.Tensor = self.model(input_ids=ids).logits
        return logits


class HFBert(HFLogits):
    """BertForSequenceClassification from a config (no download): 2 layers, width D, 8 labels."""

    def __init__(self) -> None:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=64,
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=2 * D,
            max_position_embeddings=32,
            num_labels=8,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        super().__init__(BertForSequenceClassification(config))


def llama_lm(vocab_size: int = 64, hidden_size: int = D, seed: int | None = None) -> Any:
    """A transformers LlamaForCausalLM from a config (no download): 2 layers, 4 heads over 2 KV
    heads, FFN 2 × ``hidden_size``; with ``seed``, its weights drawn from that seed without touching
    the global generator."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
    )
    if seed is None:
        return LlamaForCausalLM(config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


class HFLlama(HFLogits):
    """LlamaForCausalLM from a config (no download): 2 layers, width D, grouped-query attention."""

    def __init__(self) -> None:
        super().__init__(llama_lm(64, D))


@dataclass(frozen=True)
class Toy:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]
    head: str | None  # a module that can go in modules_to_save
    transformers: bool = False  # a transformers model: only for ``model_level`` methods


def _seeded(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            model = cls()
            # Non-zero biases everywhere so that nothing is accidentally symmetric.
            for p in model.parameters():
                p.data.add_(0.05 * torch.randn_like(p))
        return model.eval()

    return build


def _float_input(shape: tuple[int, ...]) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(*shape, generator=g)


def _token_ids(shape: tuple[int, ...]) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randint(1, 64, shape, generator=g)  # 0 is BERT's [PAD]


class WideMLP(nn.Module):
    """An MLP wide enough for NF4's blocks (64 values, 256 blocks per scaler): 128 x 128 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.wide1 = nn.Linear(128, 128)
        self.wide2 = nn.Linear(128, 128)
        self.act = nn.ReLU()
        self.out = nn.Linear(128, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.wide2(self.act(self.wide1(x)))))


def _quantized(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """The model with its (non-head) linear weights stored in NF4: a QLoRA-style 4-bit base."""

    def make() -> nn.Module:
        from deltatune.runtime.quant import quantize

        model = build()
        quantize(model, ["wide1", "wide2"])  # the head stays float, as in QLoRA
        return model

    return make


TOYS = [
    Toy("mlp", _seeded(MLP), _float_input((5, D)), "head"),
    Toy("attention", _seeded(Blocks), _float_input((3, 6, D)), None),
    Toy("embedding", _seeded(EmbeddingModel), lambda g: torch.randint(0, 50, (4, 7), generator=g), "proj"),
    Toy("conv1d", _seeded(GPT2Style), _float_input((3, 5, D)), None),
    Toy("mlp-nf4", _quantized(_seeded(WideMLP)), _float_input((5, 128)), "out"),
    Toy("transformer", _seeded(TinyLlama), lambda g: torch.randint(0, 50, (3, 6), generator=g), "head"),
    Toy("bert", _seeded(HFBert), _token_ids((3, 6)), "model.classifier", transformers=True),
    Toy("llama", _seeded(HFLlama), _token_ids((3, 6)), None, transformers=True),
]
