"""Prompt tuning: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester, Al-Rfou, Constant;
EMNLP 2021), arXiv:2104.08691.

    h = Body([P; E(x)]),    P ∈ R^{n × d} trainable, the model frozen

``n`` virtual token embeddings are prepended to the input embeddings ``E(x)``; nothing inside the
model changes. The attention mask gets ``n`` ones, BERT's token types ``n`` zeros, and the virtual
positions are cut from the body's per-token output, so a causal LM's logits (and labels) stay one per
real token (see :mod:`deltatune.methods.prompts.virtual`, which also extends the mask on every step
of ``generate()`` with the KV cache). With ``insert_at=0`` (Lester et al., and PEFT) the prompt
comes first, so BERT's pooler reads the first virtual token; ``insert_at=1`` keeps a leading [CLS]
first and puts the prompt right after it (P-tuning's templates also keep [CLS] first), so the
classifier still reads [CLS].

Initialisers (the paper, §3.2): :class:`RandomUniform` (U(-0.5, 0.5)), :class:`SampledVocab` (rows of
the embedding matrix at random token ids; the paper samples the 5 000 most common tokens, here any
token) and :class:`FromText` (the embeddings of a text's tokens, e.g. the task description or the
class labels, tokenised with the model's tokenizer; repeated if shorter than ``n``).

Closed forms, with d the hidden size:  trainable = stored = n · d,   stored bytes = 4 · n · d.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from deltatune import PromptTuning, inject
    >>> model = BertForSequenceClassification(BertConfig(
    ...     vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    >>> att = inject(model, PromptTuning(num_virtual_tokens=5))  # goes to model.bert
    >>> att.info("default").targets, att.closed_form("default")
    (('bert',), (40, 160))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ...contract import ReplacingLayer, Suite, register
from ...contract.fields import Float, Instance, Int, component, param, validate
from . import virtual


class PromptInit:
    """An initialiser of the ``(n, d)`` virtual token embeddings (frozen dataclass components)."""

    def initialise(
        self, prompts: torch.Tensor, embedding: nn.Embedding, *, generator: torch.Generator
    ) -> None:  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must implement initialise()")


@component("random_uniform")
@dataclass(frozen=True)
class RandomUniform(PromptInit):
    """P ~ U(-bound, bound) (the paper's random init uses bound 0.5)."""

    bound: float = param(0.5, Float(0.0, low_open=True), "prompts start uniform in [-bound, bound]")

    def __post_init__(self) -> None:
        validate(self)

    def initialise(
        self, prompts: torch.Tensor, embedding: nn.Embedding, *, generator: torch.Generator
    ) -> None:
        prompts.uniform_(-self.bound, self.bound, generator=generator)


@component("sampled_vocab")
@dataclass(frozen=True)
class SampledVocab(PromptInit):
    """Each row a copy of the embedding of a token id drawn uniformly from the vocabulary."""

    def initialise(
        self, prompts: torch.Tensor, embedding: nn.Embedding, *, generator: torch.Generator
    ) -> None:
        ids = torch.randint(0, embedding.num_embeddings, (prompts.shape[0],), generator=generator)
        if embedding.weight.is_meta:  # shapes only (deltatune.runtime.estimate): no values to copy
            return
        prompts.copy_(embedding.weight.detach()[ids.to(embedding.weight.device)].to(prompts))


@component("from_text")
@dataclass(frozen=True)
class FromText(PromptInit):
    """The embeddings of the tokens of a text, repeated to fill ``n`` rows.

    Build it with :meth:`from_text`, which tokenises with the model's tokenizer; the token ids are
    what is stored (the text is kept to say what they were).
    """

    token_ids: tuple[int, ...] = ()
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # JSON gives a list back: store a tuple so that configs compare equal and stay hashable.
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.token_ids):
            raise ValueError(f"FromText.token_ids must be integers, got {self.token_ids!r}")
        object.__setattr__(self, "token_ids", tuple(self.token_ids))

    @classmethod
    def from_text(cls, text: str, tokenizer: Any) -> FromText:
        """Tokenise ``text`` (without special tokens) with a transformers tokenizer."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return cls(token_ids=tuple(int(i) for i in ids), text=text)

    def initialise(
        self, prompts: torch.Tensor, embedding: nn.Embedding, *, generator: torch.Generator
    ) -> None:
        n = int(prompts.shape[0])
        if not self.token_ids:
            raise ValueError("FromText.token_ids must hold at least one token id; use FromText.from_text()")
        if len(self.token_ids) > n:
            raise ValueError(
                f"FromText: the text has {len(self.token_ids)} tokens, more than num_virtual_tokens={n}; "
                "shorten the text or raise num_virtual_tokens"
            )
        bad = [i for i in self.token_ids if not 0 <= i < embedding.num_embeddings]
        if bad:
            raise ValueError(
                f"FromText.token_ids {bad[:4]} are outside the vocabulary of {embedding.num_embeddings}"
            )
        ids = torch.tensor([self.token_ids[i % len(self.token_ids)] for i in range(n)])
        prompts.copy_(embedding.weight.detach()[ids.to(embedding.weight.device)].to(prompts))


def prompt_dtype(embedding: nn.Embedding) -> torch.dtype:
    """float32 on a bf16/fp16 model, float64 on a float64 one."""
    return torch.promote_types(embedding.weight.dtype, torch.float32)


@register
@dataclass(frozen=True, kw_only=True)
class PromptTuning(virtual.OnTheBody):
    """Trainable virtual token embeddings prepended to the input.

    Fields (paper defaults in brackets):
        num_virtual_tokens: n, the prompt length [20: the paper finds 20 about as good as 100-150
            on T5-XXL and clearly better than 1-5].
        init: initialiser of the prompt [SampledVocab(); the paper's best is class labels or sampled
            vocabulary, far ahead of random uniform on small models].
        insert_at: input position of the prompt, 0 (first) or 1 (after a leading [CLS]) [0]; 1 is
            for inputs that start with a special token, not for left-padded generation.
    """

    num_virtual_tokens: int = param(20, Int(min=1), "n, the number of virtual tokens")
    init: PromptInit = param(SampledVocab(), Instance((PromptInit,)), "initialiser of the prompt")  # noqa: RUF009 - frozen
    insert_at: int = param(0, Int(min=0, max=1), "input position of the prompt: 0 first, 1 after [CLS]")

    name: ClassVar[str] = "prompt_tuning"

    def default_lr(self) -> float:
        """1e-2: a few input embeddings carry the whole task (Lester et al. train them at 0.3 with
        Adafactor); chosen on SST-2's validation split (MiniLM, 20 tokens, 150 steps, AdamW:
        benchmarks/README.md, "Each method at its own learning rate"): 69.4 at 1e-2, 60.3 at 3.3e-3,
        the majority class from 3e-2 up."""
        return 1e-2

    suite: ClassVar[Suite] = Suite(
        example={"num_virtual_tokens": 3},
        near_identity_at_init=False,  # n extra tokens change every output at once
    )

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> VirtualTokens:
        virtual.config_of(type(self).__name__, base, path)
        embedding = virtual.embedding_of(base)
        prompts = torch.empty(self.num_virtual_tokens, embedding.embedding_dim, dtype=prompt_dtype(embedding))
        self.init.initialise(prompts, embedding, generator=generator)
        return VirtualTokens(prompts, self.insert_at)

    def parameter_count(self, base: nn.Module) -> int:
        return self.num_virtual_tokens * virtual.embedding_of(base).embedding_dim

    def stored_bytes(self, base: nn.Module) -> int:
        return self.parameter_count(base) * prompt_dtype(virtual.embedding_of(base)).itemsize


class VirtualTokens(ReplacingLayer):
    """Replacing layer on the body: runs it with ``prompts`` (n, d) before the input embeddings."""

    def __init__(self, prompts: torch.Tensor, insert_at: int = 0) -> None:
        super().__init__()
        self.prompts = nn.Parameter(prompts)  # (n, d)
        self.insert_at = insert_at

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return virtual.forward_with_virtual_tokens(base, args, kwargs, self.prompts, self.insert_at)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.prompts.shape[0]}, dim={self.prompts.shape[1]}"
