"""P-tuning: GPT Understands, Too (Liu, Zheng, Du, Ding, Qian, Yang, Tang; 2021), arXiv:2103.10385.

    h = Body([P; E(x)]),    P = f(E'),   E' ∈ R^{n × d} trainable,  f a prompt encoder

Like prompt tuning, ``n`` virtual tokens go into the input (first, as in PEFT, or after a leading
[CLS] with ``insert_at=1``; the paper also places them between template parts), but they are
produced by a small *prompt encoder* ``f`` that couples them, which the paper finds trains faster
and more stably than free embeddings (§3.2):

* ``encoder="lstm"`` (the paper): a 2-layer bidirectional LSTM (hidden h per direction) followed by
  ``Linear(2h, 2h) -> ReLU -> Linear(2h, d)``;
* ``encoder="mlp"``: ``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)``.

(The same layouts as PEFT's ``PromptEncoder``.) What is saved is the encoder's *output* ``P``
(n x d), not the encoder: after training, ``f(E')`` is one constant tensor, which is all that
inference needs, and it is 100-1000x smaller than the LSTM. A loaded adapter is therefore plain
virtual tokens (it trains on as prompt tuning if loaded trainable) and gives the same outputs.

Closed forms, with d the hidden size and h ``encoder_hidden_size``:

    stored = n · d (4 bytes each)
    trainable (mlp)  = n·d + (d·h + h) + (h·h + h) + (h·d + d)
    trainable (lstm) = n·d + Σ_{layer 1,2} 2·4h·(in + h + 2) + (2h·2h + 2h) + (2h·d + d),
                       in = d for the first LSTM layer and 2h for the second

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from deltatune import PTuning, inject
    >>> model = BertForSequenceClassification(BertConfig(
    ...     vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    >>> att = inject(model, PTuning(num_virtual_tokens=5, encoder="mlp", encoder_hidden_size=4))
    >>> att.closed_form("default")  # 5*8 + (8*4+4) + (4*4+4) + (4*8+8);  stored 4 * 5*8
    (136, 160)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...contract import ReplacingLayer, Suite, register
from ...contract.fields import Int, OneOf, param
from . import virtual


@register
@dataclass(frozen=True, kw_only=True)
class PTuning(virtual.OnTheBody):
    """Virtual tokens produced by a trainable prompt encoder.

    Fields (paper defaults in brackets):
        num_virtual_tokens: n, the number of virtual tokens [the paper's templates use 3-9 per slot;
            20 here, as the prompt-tuning default].
        encoder: the prompt encoder, ``"lstm"`` (bidirectional, 2 layers) or ``"mlp"`` ["lstm"].
        encoder_hidden_size: h, the encoder's hidden width [128].
        insert_at: input position of the virtual tokens, 0 (first, as PEFT) or 1 (after a leading
            [CLS], as the paper's templates) [0].
    """

    num_virtual_tokens: int = param(20, Int(min=1), "n, the number of virtual tokens")
    encoder: str = param("lstm", OneOf(("lstm", "mlp")), "prompt encoder: bidirectional LSTM + MLP, or MLP")
    encoder_hidden_size: int = param(128, Int(min=1), "hidden width h of the prompt encoder")
    insert_at: int = param(0, Int(min=0, max=1), "input position of the prompt: 0 first, 1 after [CLS]")

    name: ClassVar[str] = "p_tuning"
    suite: ClassVar[Suite] = Suite(
        example={"num_virtual_tokens": 3, "encoder_hidden_size": 4},
        near_identity_at_init=False,  # n extra tokens change every output at once
    )

    def default_lr(self) -> float:
        """3e-3, chosen on SST-2's validation split (MiniLM, 20 tokens from an LSTM encoder, 150 steps:
        benchmarks/README.md, "Each method at its own learning rate"): 64.5 at 3e-3, 60.0 at 1e-3,
        56.4 at 1e-2."""
        return 3e-3

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> EncodedPrompt:
        virtual.config_of(type(self).__name__, base, path)
        d = virtual.embedding_of(base).embedding_dim
        dtype = torch.promote_types(virtual.embedding_of(base).weight.dtype, torch.float32)
        with torch.random.fork_rng(devices=[]):  # nn.LSTM/nn.Linear draw a default init: keep the global RNG
            encoder = PromptEncoder(self.encoder, self.num_virtual_tokens, d, self.encoder_hidden_size)
        fans = encoder.fans()
        with torch.no_grad():
            encoder.inputs.normal_(generator=generator)  # nn.Embedding's N(0, 1)
            for p in encoder.parameters():
                if p is not encoder.inputs:
                    # PyTorch's default for nn.Linear and nn.LSTM: U(-1/sqrt(fan), 1/sqrt(fan))
                    bound = fans[id(p)] ** -0.5
                    p.uniform_(-bound, bound, generator=generator)
        return EncodedPrompt(encoder.to(dtype), self.insert_at)

    def parameter_count(self, base: nn.Module) -> int:
        d = virtual.embedding_of(base).embedding_dim
        n, h = self.num_virtual_tokens, self.encoder_hidden_size
        if self.encoder == "mlp":
            return n * d + (d * h + h) + (h * h + h) + (h * d + d)
        lstm = sum(2 * 4 * h * (inp + h + 2) for inp in (d, 2 * h))
        return n * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)

    def stored_bytes(self, base: nn.Module) -> int:
        emb = virtual.embedding_of(base)
        dtype = torch.promote_types(emb.weight.dtype, torch.float32)
        return self.num_virtual_tokens * emb.embedding_dim * dtype.itemsize


class PromptEncoder(nn.Module):
    """f(E'): the virtual token inputs ``E'`` (n, d) and the encoder that maps them to ``P`` (n, d)."""

    def __init__(self, kind: str, n: int, d: int, h: int) -> None:
        super().__init__()
        self.kind = kind
        self.inputs = nn.Parameter(torch.empty(n, d))  # E'
        self.lstm: nn.LSTM | None = None
        if kind == "lstm":
            self.lstm = nn.LSTM(d, h, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def fans(self) -> dict[int, int]:
        """id(parameter) -> the fan PyTorch's default init uses: in_features (Linear), hidden (LSTM)."""
        out: dict[int, int] = {}
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                out[id(m.weight)] = out[id(m.bias)] = int(m.in_features)
        if self.lstm is not None:
            for p in self.lstm.parameters():
                out[id(p)] = int(self.lstm.hidden_size)
        return out

    def forward(self) -> torch.Tensor:
        x = self.inputs
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)  # (n, 2h)
        out: torch.Tensor = self.head(x)  # (n, d)
        return out


class EncodedPrompt(ReplacingLayer):
    """Replacing layer on the body: virtual tokens from the encoder (training) or plain (loaded).

    ``export_state`` stores the encoder's output ``{"prompts": (n, d)}``; ``import_state`` of it
    leaves plain virtual tokens.
    """

    def __init__(self, encoder: PromptEncoder, insert_at: int = 0) -> None:
        super().__init__()
        self.encoder: PromptEncoder | None = encoder
        self.prompts: nn.Parameter | None = None
        self.insert_at = insert_at

    def values(self) -> torch.Tensor:
        if self.prompts is not None:
            return self.prompts
        assert self.encoder is not None  # one of the two is always set (constructor, import_state)
        out: torch.Tensor = self.encoder()
        return out

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return virtual.forward_with_virtual_tokens(base, args, kwargs, self.values(), self.insert_at)

    def export_state(self) -> dict[str, torch.Tensor]:
        return {"prompts": self.values().detach().clone()}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        current = self.values()
        if set(state) != {"prompts"} or tuple(state["prompts"].shape) != tuple(current.shape):
            raise ValueError(
                f"P-tuning state must be {{'prompts': {tuple(current.shape)}}}, got "
                f"{ {k: tuple(v.shape) for k, v in state.items()} }"
            )
        self.encoder = None
        self.prompts = nn.Parameter(state["prompts"].to(current.dtype).clone())
