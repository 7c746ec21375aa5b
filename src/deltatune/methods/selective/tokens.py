"""Trainable tokens: only some rows of the embedding matrix (and of the output head) train.

Chat fine-tuning adds special tokens (``<|tool_call|>``) whose embeddings start random; training the
whole embedding and head (``modules_to_save``) stores two ``vocab x dim`` matrices per adapter. Here
only the listed rows train (PEFT's ``TrainableTokens``, peft 2898):

    embedding:  E'[t] = V[t] for t in token_ids, E[t] otherwise
    head:       logits'[..., t] = logits[..., t] + h · (V[t] - W[t]) for t in token_ids

``V`` (``len(token_ids) x dim``) starts as the current rows and replaces them, as PEFT's does (a model
whose new rows are drawn again at load gets the trained values, not a delta on other random ones).
The forward computes the base output and overwrites only those rows (or logits columns) in place: no
copy of the matrix per step. A head that shares the embedding's weight (tied, SmolLM2) shares ``V``:
one set of rows, stored once; an untied head targeted too gets rows of its own. ``merge`` writes the
rows into the weights.

Default targets: the input embedding and the output head (PEFT's default adapts the head only when it
is tied; a new token's head row must train too for the model to emit it).

Closed forms, per distinct weight adapted (the tied pair counts once), ``k = len(token_ids)``:

    trainable = stored = k · dim        stored bytes = 4 · k · dim   (float32)

Example:
    >>> from torch import nn
    >>> from deltatune import inject
    >>> net = nn.Sequential(nn.Embedding(10, 4))
    >>> inject(net, TrainableTokens(token_ids=(3, 7)), targets=["0"]).closed_form("default")
    (8, 32)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...contract import ReplacingLayer, Suite, register, shallow_copy
from ...contract.fields import Check, param
from ...contract.method import Method
from ...targets import module_kind


@dataclass(frozen=True)
class TokenIds(Check):
    """A non-empty tuple of distinct non-negative integers."""

    def ok(self, value: Any) -> bool:
        return (
            isinstance(value, tuple)
            and len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
            and len(set(value)) == len(value)
        )

    def describe(self) -> str:
        return "a non-empty tuple of distinct token ids (integers >= 0)"

    def counterexample(self) -> Any:
        return (1, 1)


def rows_of(base: nn.Module) -> torch.Tensor:
    """The matrix whose rows are the tokens: an embedding's weight, a head's ``(vocab, dim)`` weight."""
    weight = base.weight
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"{type(base).__name__} has no 2-D weight whose rows are tokens")
    return weight


def _dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


@register
@dataclass(frozen=True, kw_only=True)
class TrainableTokens(Method):
    """Train the embedding rows (and output-head rows) of some tokens only.

    Fields:
        token_ids: the tokens whose rows train (new special tokens, typically).
    """

    token_ids: tuple[int, ...] = param((0,), TokenIds(), "the ids of the tokens whose rows train")

    name: ClassVar[str] = "trainable_tokens"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = False  # replaces rows of the module's output
    layer_types: ClassVar[tuple[str, ...]] = ("embedding", "linear")
    suite: ClassVar[Suite] = Suite(example={"token_ids": (0, 2)}, random_init=False)

    def default_targets(self, model: nn.Module) -> list[str] | None:
        """The input embedding, and the output head (whose rows of new tokens must train too for the
        model to emit them): tied, it shares the embedding's rows; untied, it gets rows of its own."""
        get_in = getattr(model, "get_input_embeddings", None)
        embedding = get_in() if callable(get_in) else None
        if not isinstance(embedding, nn.Module):
            return None
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        rows = rows_of(embedding).shape[0]
        has_head = (
            isinstance(head, nn.Module) and module_kind(head) == "linear" and rows_of(head).shape[0] == rows
        )
        wanted = [embedding] + ([head] if has_head else [])
        return [p for p, m in model.named_modules() if any(m is w for w in wanted)]

    def check_targets(self, model: nn.Module, paths: list[str]) -> None:
        for path in paths:
            self._check_vocabulary(model.get_submodule(path), path)

    def _check_vocabulary(self, base: nn.Module, path: str) -> None:
        rows = rows_of(base).shape[0]
        outside = [t for t in self.token_ids if t >= rows]
        if outside:
            raise ValueError(
                f"TrainableTokens.token_ids {outside[:8]} are outside the {rows:,} rows of {path!r} "
                f"({type(base).__name__}): resize the embeddings first "
                "(model.resize_token_embeddings(len(tokenizer)))"
            )

    def make_shared(self, bases: Mapping[str, nn.Module], generator: torch.Generator) -> TokenRows:
        return TokenRows(self.token_ids, [rows_of(b) for b in bases.values()])

    def shared_parameter_count(self, bases: Mapping[str, nn.Module]) -> int:
        return sum(len(self.token_ids) * w.shape[1] for w in _distinct([rows_of(b) for b in bases.values()]))

    def shared_stored_bytes(self, bases: Mapping[str, nn.Module]) -> int:
        weights = _distinct([rows_of(b) for b in bases.values()])
        return sum(len(self.token_ids) * w.shape[1] * _dtype(w).itemsize for w in weights)

    def parameter_count(self, base: nn.Module) -> int:
        return 0  # (the rows are the adapter's shared state: a tied pair stores them once)

    def stored_bytes(self, base: nn.Module) -> int:
        return 0

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> TokenRowsLayer:
        if not isinstance(shared, TokenRows):
            raise TypeError("TrainableTokens.wrap needs the adapter's TokenRows (make_shared)")
        self._check_vocabulary(base, path)
        kind = module_kind(base) or ""
        return TokenRowsLayer(
            shared, shared.key_of(rows_of(base)), kind, self.token_ids, rows_of(base).shape[0]
        )


def _distinct(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for w in weights:
        if not any(w is o for o in out):
            out.append(w)
    return out


def row_keys(weights: list[torch.Tensor]) -> list[str]:
    """The key of each weight's trained rows in :class:`TokenRows` (``rows_<i>``, the distinct weights
    numbered in order: a tied embedding and head get the same key)."""
    distinct = _distinct(weights)
    return [f"rows_{next(i for i, d in enumerate(distinct) if d is w)}" for w in weights]


class TokenRows(nn.Module):
    """The trained rows: one ``(k, dim)`` parameter per distinct weight adapted (``rows_0``, …), each
    starting as that weight's rows of the tokens; a tied embedding and head share one."""

    def __init__(self, token_ids: tuple[int, ...], weights: list[torch.Tensor]) -> None:
        super().__init__()
        self._keys: list[tuple[torch.Tensor, str]] = []
        index = torch.tensor(token_ids, dtype=torch.long)
        for weight, key in zip(weights, row_keys(weights), strict=True):
            if hasattr(self, key):  # (a tied weight: its rows exist already)
                continue
            rows = weight.detach().index_select(0, index.to(weight.device)).to(_dtype(weight))
            self.register_parameter(key, nn.Parameter(rows.clone()))
            self._keys.append((weight, key))

    def key_of(self, weight: torch.Tensor) -> str:
        return next(key for w, key in self._keys if w is weight)


class TokenRowsLayer(ReplacingLayer):
    """The rows of some tokens, written over the output of an embedding (its rows) or of a head
    (its logits columns); ``rows`` lives in the adapter's :class:`TokenRows`."""

    token_ids: torch.Tensor
    slot: torch.Tensor

    def __init__(
        self, shared: TokenRows, key: str, kind: str, token_ids: tuple[int, ...], vocabulary: int
    ) -> None:
        super().__init__()
        self._shared = [shared]  # (not a submodule: the adapter saves its shared state once)
        self.key = key
        self.kind = kind
        ids = torch.tensor(token_ids, dtype=torch.long)
        self.register_buffer("token_ids", ids, persistent=False)
        # an embedding's lookup table, made once: slot[t] = the row of token t in `rows`, else -1
        slot = torch.full((vocabulary if kind == "embedding" else 0,), -1, dtype=torch.long)
        if kind == "embedding":
            slot[ids] = torch.arange(len(ids))
        self.register_buffer("slot", slot, persistent=False)

    @property
    def rows(self) -> torch.Tensor:
        rows: torch.Tensor = getattr(self._shared[0], self.key)
        return rows

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = base(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        ids = self.token_ids.to(out.device)
        if self.kind == "embedding":
            where = self.slot.to(x.device)[x]
            hit = where >= 0
            scale = getattr(base, "embed_scale", None)  # (Gemma-style scaled embeddings)
            new = self.rows[where[hit]].to(out.dtype)
            # in place: the base's output is fresh, and embedding's backward does not read it; also
            # with no listed token in the batch (the rows get a zero gradient, never none: DDP)
            out[hit] = new * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else new
            return out
        # the head's columns move by x (V - W[ids])ᵀ: exactly zero at init, the replaced rows'
        # logits (up to rounding) after; added in place (the logits are fresh, and a linear layer's
        # backward does not read its output): no second vocabulary-wide tensor per step
        weight = rows_of(base)
        change = self.rows - weight.detach()[ids.to(weight.device)].to(self.rows.dtype)
        return out.index_add_(-1, ids, F.linear(x, change.to(x.dtype)).to(out.dtype))

    def merged(self, base: nn.Module) -> nn.Module:
        """A plain copy of ``base`` with the rows written into its weight."""
        weight = rows_of(base)
        new_weight = weight.detach().clone()
        new_weight[self.token_ids.to(weight.device)] = self.rows.detach().to(weight.dtype)
        new = shallow_copy(base)
        new.weight = nn.Parameter(new_weight, requires_grad=False)
        return new

    def extra_repr(self) -> str:
        return f"kind={self.kind}, tokens={self.token_ids.tolist()[:8]}, rows={self.key}"
