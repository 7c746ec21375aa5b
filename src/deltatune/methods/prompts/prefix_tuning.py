"""Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, ACL 2021),
arXiv:2101.00190; P-tuning v2 (Liu et al. 2022, arXiv:2110.07602) as the variant without the MLP.

    head_i = Attn(x W_q, [P_k^(l); x W_k], [P_v^(l); x W_v]),    P^(l) ∈ R^{n × d_kv} per layer l

Every layer's attention sees ``n`` trainable key and value vectors before those of the real tokens;
the model is frozen. Training the prefixes directly is unstable (the paper, §4.3), so they are
reparameterised: ``P = MLP(P')`` with a small ``P' ∈ R^{n × d}`` and
``MLP = Linear(d, h) -> tanh -> Linear(h, L · 2 · d_kv)``; after training only ``P`` is needed, so
the saved file holds the plain prefixes (the MLP is *collapsed*) and loading gives the same outputs.
With ``reparameterize=False`` the prefixes are the parameters themselves (P-tuning v2's deep
prompts). The prefixes go in through a prefilled ``DynamicCache`` (see
:mod:`deltatune.methods.prompts.virtual`); real tokens keep their positions, and ``generate()``
works with the cache.

Closed forms, with L layers, d_kv = key/value heads x head dim, d the hidden size, h the MLP width:

    stored = n · L · 2 · d_kv            (4 bytes each)
    trainable = stored                                        (reparameterize=False)
    trainable = n·d + (d·h + h) + (h · L·2·d_kv + L·2·d_kv)   (reparameterize=True)

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from deltatune import PrefixTuning, inject
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=32))
    >>> att = inject(model, PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=8))
    >>> att.closed_form("default")  # n*d + d*h+h + h*L*2*8 + L*2*8;  stored 4 * n*L*2*8
    (472, 384)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...contract import ReplacingLayer, Suite, register
from ...contract.fields import Bool, Int, OneOf, param
from . import virtual

_DEFAULT_HIDDEN = 512


@register
@dataclass(frozen=True, kw_only=True)
class PrefixTuning(virtual.OnTheBody):
    """Trainable key/value prefixes in every attention layer.

    Fields (paper defaults in brackets):
        num_virtual_tokens: n, the prefix length [10 for table-to-text, 200 for summarisation].
        reparameterize: train through the MLP P = MLP(P') [True]; False is P-tuning v2.
        encoder_hidden_size: h, the MLP's hidden width, only with reparameterize [512].
        positions: the real tokens' positions: "base" from 0, as the base model numbers them without
            a prefix (BERT's absolute positions and RoPE phases as in pre-training), or
            "after_prefix" from n, the prefix counted as past tokens, as PEFT does
            (:func:`deltatune.import_peft` sets it; :func:`deltatune.export_peft` needs it) ["base"].
    """

    num_virtual_tokens: int = param(10, Int(min=1), "n, the number of prefix positions")
    reparameterize: bool = param(True, Bool(), "train through an MLP (Li & Liang); False: P-tuning v2")
    encoder_hidden_size: int = param(_DEFAULT_HIDDEN, Int(min=1), "hidden width h of the MLP")
    positions: str = param(
        "base",
        OneOf(("base", "after_prefix")),
        "real tokens' positions: 'base' from 0 (as without a prefix), 'after_prefix' from n (as PEFT)",
    )

    name: ClassVar[str] = "prefix_tuning"
    suite: ClassVar[Suite] = Suite(
        example={"num_virtual_tokens": 3, "encoder_hidden_size": 8},
        near_identity_at_init=False,  # attention mass moves to the prefix at once
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reparameterize and self.encoder_hidden_size != _DEFAULT_HIDDEN:
            raise ValueError(
                "PrefixTuning.encoder_hidden_size is the MLP's width and is only used with "
                f"reparameterize=True; leave it at {_DEFAULT_HIDDEN}, got {self.encoder_hidden_size}"
            )

    def _shape(self, base: nn.Module, path: str = "") -> tuple[int, int, int, int]:
        config = virtual.config_of(type(self).__name__, base, path)
        layers, kv_heads, head_dim = virtual.attention_shape(type(self).__name__, config)
        return layers, kv_heads, head_dim, virtual.embedding_of(base).embedding_dim

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> Prefixes:
        layers, kv_heads, head_dim, hidden = self._shape(base, path)
        virtual.require_cache_keyword(type(self).__name__, base)  # the prefixes go in through the cache
        dtype = torch.promote_types(virtual.embedding_of(base).weight.dtype, torch.float32)
        n = self.num_virtual_tokens
        out_features = layers * 2 * kv_heads * head_dim
        if not self.reparameterize:
            # P-tuning v2 draws its deep prompts from an nn.Embedding: N(0, 1).
            plain = torch.randn(n, out_features, generator=generator, dtype=dtype)
            return Prefixes(layers, kv_heads, head_dim, plain=plain, offset=self._offset())
        h = self.encoder_hidden_size
        seed = torch.empty(n, hidden, dtype=dtype).normal_(generator=generator)  # P', as nn.Embedding
        w1, b1 = _linear_init(h, hidden, dtype, generator)
        w2, b2 = _linear_init(out_features, h, dtype, generator)
        mlp = PrefixMLP(seed, w1, b1, w2, b2)
        return Prefixes(layers, kv_heads, head_dim, mlp=mlp, offset=self._offset())

    def _offset(self) -> int:
        """The first real token's position (see ``positions``)."""
        return self.num_virtual_tokens if self.positions == "after_prefix" else 0

    def parameter_count(self, base: nn.Module) -> int:
        layers, kv_heads, head_dim, hidden = self._shape(base)
        out = layers * 2 * kv_heads * head_dim
        n, h = self.num_virtual_tokens, self.encoder_hidden_size
        if not self.reparameterize:
            return n * out
        return n * hidden + hidden * h + h + h * out + out

    def stored_bytes(self, base: nn.Module) -> int:
        layers, kv_heads, head_dim, _ = self._shape(base)
        dtype = torch.promote_types(virtual.embedding_of(base).weight.dtype, torch.float32)
        return self.num_virtual_tokens * layers * 2 * kv_heads * head_dim * dtype.itemsize


def _linear_init(
    out_features: int, in_features: int, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default init, U(-1/sqrt(in), 1/sqrt(in)) for weight and bias, from ``generator``."""
    bound = in_features**-0.5
    weight = torch.empty(out_features, in_features, dtype=dtype).uniform_(-bound, bound, generator=generator)
    bias = torch.empty(out_features, dtype=dtype).uniform_(-bound, bound, generator=generator)
    return weight, bias


class PrefixMLP(nn.Module):
    """Li & Liang's reparameterisation: P = W2 tanh(W1 P' + b1) + b2, for all layers at once."""

    def __init__(
        self, seed: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
    ) -> None:
        super().__init__()
        self.seed = nn.Parameter(seed)  # P': (n, d)
        self.w1, self.b1 = nn.Parameter(w1), nn.Parameter(b1)  # (h, d), (h,)
        self.w2, self.b2 = nn.Parameter(w2), nn.Parameter(b2)  # (L·2·d_kv, h), (L·2·d_kv,)

    def forward(self) -> torch.Tensor:
        hidden = torch.tanh(torch.nn.functional.linear(self.seed, self.w1, self.b1))  # (n, h)
        return torch.nn.functional.linear(hidden, self.w2, self.b2)  # (n, L·2·d_kv)


class Prefixes(ReplacingLayer):
    """Replacing layer on the body: the per-layer prefixes, plain or from the MLP.

    ``export_state`` collapses the MLP to ``{"prefixes": (n, L·2·d_kv)}``; ``import_state`` of such
    a state leaves a plain layer (its prefixes train directly if the adapter is loaded trainable).
    """

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        plain: torch.Tensor | None = None,
        mlp: PrefixMLP | None = None,
        offset: int = 0,
    ) -> None:
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.mlp = mlp
        self.prefixes = nn.Parameter(plain) if plain is not None else None  # (n, L·2·d_kv)
        self.offset = offset  # added to the real tokens' positions (PrefixTuning.positions)

    def values(self) -> torch.Tensor:
        """All prefixes as one ``(n, L·2·d_kv)`` tensor (through the MLP while it exists)."""
        if self.prefixes is not None:
            return self.prefixes
        assert self.mlp is not None  # one of the two is always set (constructor, import_state)
        out: torch.Tensor = self.mlp()
        return out

    def per_layer(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(keys, values)] per layer, each ``(n, kv_heads, head_dim)``."""
        p = self.values()
        n = p.shape[0]
        p = p.view(n, self.layers, 2, self.kv_heads, self.head_dim)
        return [(p[:, i, 0], p[:, i, 1]) for i in range(self.layers)]

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return virtual.forward_with_prefix(base, args, kwargs, self.per_layer(), self.offset)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"prefixes": self.values().detach().clone()}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.values().shape
        if set(state) != {"prefixes"} or tuple(state["prefixes"].shape) != tuple(expected):
            raise ValueError(
                f"prefix tuning state must be {{'prefixes': {tuple(expected)}}}, got "
                f"{ {k: tuple(v.shape) for k, v in state.items()} }"
            )
        dtype = self.values().dtype
        self.mlp = None
        self.prefixes = nn.Parameter(state["prefixes"].to(dtype).clone())

    def extra_repr(self) -> str:
        form = "plain" if self.prefixes is not None else "mlp"
        return f"layers={self.layers}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, {form}"
