"""Running a transformers *body* (``BertModel``, ``LlamaModel``, ...) with virtual tokens or prefixes.

Prompt tuning and P-tuning prepend ``n`` trainable vectors to the input embeddings; prefix tuning
prepends ``n`` trainable keys and values to the attention of every layer. Both are model-level
methods: they wrap the body (the module that owns the input embeddings and the blocks) with one
replacing layer, and this module does the bookkeeping that such a layer needs around
``body(...)``, for the KV cache of transformers >= 5 (``DynamicCache``, as ``generate()`` uses it):

* virtual tokens (:func:`forward_with_virtual_tokens`): on the first forward (no cache, or an empty
  one) ``inputs_embeds = [P; E(input_ids)]``, the attention mask gets ``n`` ones in front, token
  types ``n`` zeros, explicit ``position_ids`` become ``[0..n-1, position_ids + n]``; the virtual
  positions are cut from ``last_hidden_state`` (and ``hidden_states``), so the head sees exactly one
  vector per real token and causal-LM logits line up with the caller's labels. On later forwards of
  ``generate()`` the cache already holds the virtual tokens' keys and values: only the mask (and
  explicit positions) are extended/shifted, every step.
* prefixes (:func:`forward_with_prefix`): on the first forward a ``DynamicCache`` is prefilled with
  the ``n`` keys and values of every layer (the caller's empty cache during ``generate()``, a fresh
  one otherwise); the attention mask gets ``n`` ones in front on every forward. Real tokens keep the
  positions the base model gives them (``position_ids`` are passed explicitly, counted without the
  prefix), so training and ``generate()`` agree and BERT's absolute positions do not shift; with
  ``offset=n`` they start at ``n`` instead, the prefix counted as past tokens (PEFT's convention).

Across transformers releases (:func:`cache_keyword`): the body's KV cache argument is ``cache`` from
5.24 on (``past_key_values`` is a deprecated alias there, dropped when both are given) and
``past_key_values`` before; the cache goes in under the name the body's own ``forward`` declares,
never the deprecated one. Releases before 5.5 also take ``cache_position`` (the query's indices in
the cache); it is shifted by the ``n`` cached virtual positions like ``position_ids``. A body whose
forward takes no cache cannot take a prefix (an error naming its class), and a body that is handed
the prefix cache but does not extend it (the prefix was ignored) is an error, never a silent no-op.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> body = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
    ...                             num_attention_heads=2, intermediate_size=16)).eval()
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> out = forward_with_virtual_tokens(body, (ids,), {}, torch.zeros(4, 8))
    >>> tuple(out.last_hidden_state.shape)  # the 4 virtual positions are cut again
    (1, 3, 8)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ... import anatomy
from ...contract import Method


def is_body(module: nn.Module) -> bool:
    """A module that owns input embeddings (``get_input_embeddings()``) and no inner module that does:
    ``BertModel`` inside ``BertForSequenceClassification``, ``LlamaModel`` inside ``LlamaForCausalLM``."""
    if not _owns_embeddings(module):
        return False
    return not any(_owns_embeddings(m) for m in module.modules() if m is not module)


def _owns_embeddings(module: nn.Module) -> bool:
    get = getattr(type(module), "get_input_embeddings", None)
    if get is None or not hasattr(module, "config"):
        return False
    try:
        emb = module.get_input_embeddings()  # type: ignore[operator]
    except (NotImplementedError, AttributeError):
        return False
    return isinstance(emb, nn.Module)


def body_paths(model: nn.Module) -> list[str]:
    """Paths of the transformer bodies in ``model`` (usually exactly one; "" is the root), seeing
    through deltatune wrappers (a wrapped body is found at the wrapper's path)."""
    modules = dict(anatomy.named_modules(model))
    return [p for p, m in modules.items() if is_body(m)]


def check_body(owner: str, model: nn.Module, paths: Sequence[str]) -> None:
    """Refuse targets other than exactly the model's one transformer body."""
    bodies = body_paths(model)
    if not bodies:
        raise ValueError(
            f"{owner}: {type(model).__name__} has no transformers body (a module with "
            "get_input_embeddings() and a config); this method needs a transformers model"
        )
    if list(paths) != bodies[:1] or len(bodies) != 1:
        raise ValueError(
            f"{owner}: targets must be the model's transformer body {bodies[:2]} (give no targets), "
            f"got {list(paths)[:4]}"
        )


@dataclass(frozen=True, kw_only=True)
class OnTheBody(Method):
    """The base of the prompt family (prompt tuning, P-tuning, prefix tuning): a model-level method
    (it acts on the whole body: embeddings, masks, KV cache) placed on the transformer body and
    nowhere else."""

    model_level: ClassVar[bool] = True
    layer_types: ClassVar[tuple[str, ...]] = ("block",)

    def default_targets(self, model: nn.Module) -> list[str]:
        """The model's one body (none when it has none)."""
        return body_paths(model)[:1]

    def check_targets(self, model: nn.Module, paths: list[str]) -> None:
        """Refuse paths that are not the body (see :func:`check_body`)."""
        check_body(type(self).__name__, model, paths)


def config_of(owner: str, body: nn.Module, path: str) -> Any:
    config = getattr(body, "config", None)
    if config is None or not callable(getattr(body, "get_input_embeddings", None)):
        raise ValueError(
            f"{owner}: {path!r} is {type(body).__name__}, not a transformers body with a config and "
            "get_input_embeddings(); target the model's body (give no targets)"
        )
    return config


def embedding_of(body: nn.Module) -> nn.Embedding:
    emb = body.get_input_embeddings()  # type: ignore[operator]
    emb = getattr(emb, "base", emb)  # seen through a deltatune wrapper
    if not isinstance(emb, nn.Embedding):
        raise ValueError(
            f"{type(body).__name__}.get_input_embeddings() is {type(emb).__name__}, not nn.Embedding"
        )
    return emb


def attention_shape(owner: str, config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) from a transformers config."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not all(isinstance(v, int) for v in (layers, heads, hidden)):
        raise ValueError(
            f"{owner}: the model's config lacks num_hidden_layers/num_attention_heads/hidden_size"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads  # type: ignore[operator]
    return int(layers), int(kv_heads), int(head_dim)  # type: ignore[arg-type]


def call_arguments(body: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call as keyword arguments (outer models pass ``input_ids`` positionally)."""
    params = inspect.signature(body.forward).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise ValueError(f"{type(body).__name__}: {len(args)} positional arguments, at most {len(names)}")
    out = dict(zip(names, args, strict=False))
    twice = sorted(set(out) & set(kwargs))
    if twice:
        raise ValueError(f"{type(body).__name__}: arguments {twice} given twice")
    out.update(kwargs)
    return out


#: The names of the KV-cache argument of a transformers body's ``forward``, newest first: ``cache``
#: from transformers 5.24, ``past_key_values`` before (an alias of ``cache`` until its removal).
CACHE_NAMES = ("cache", "past_key_values")


def cache_keyword(body: nn.Module) -> str | None:
    """The name under which ``body.forward`` takes its KV cache in the installed transformers, or
    None when it takes none (read from the signature, through transformers' decorators)."""
    params = inspect.signature(body.forward).parameters
    return next((name for name in CACHE_NAMES if name in params), None)


def require_cache_keyword(owner: str, body: nn.Module) -> str:
    """:func:`cache_keyword`, or an error naming the body's class when it takes no cache."""
    name = cache_keyword(body)
    if name is None:
        raise ValueError(
            f"{owner}: {type(body).__name__}.forward takes no KV cache (neither `cache` nor "
            "`past_key_values`), so it cannot be given a prefix; use prompt tuning or a layer method"
        )
    return name


def _take_cache(body: nn.Module, kw: dict[str, Any]) -> tuple[str | None, Any]:
    """Remove the cache from the call under any of its names; return (the body's name for it, cache)."""
    given = [(k, kw.pop(k)) for k in CACHE_NAMES if k in kw]
    caches = [(k, v) for k, v in given if v is not None]
    if len(caches) > 1 and caches[0][1] is not caches[1][1]:
        raise ValueError(
            f"{type(body).__name__}: two different caches given, as `cache` and as `past_key_values`; "
            "pass one (`past_key_values` is transformers' older name for `cache`)"
        )
    return cache_keyword(body), caches[0][1] if caches else None


def _put_cache(body: nn.Module, kw: dict[str, Any], name: str | None, cache: Any) -> None:
    if cache is None:
        return
    if name is None:
        raise ValueError(
            f"{type(body).__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`), "
            f"but was given a {type(cache).__name__}"
        )
    kw[name] = cache


def _shift_cache_position(kw: dict[str, Any], n: int, first: bool) -> None:
    """transformers < 5.5: ``cache_position`` counts the caller's tokens; the body's cache also holds
    the ``n`` virtual positions (before them all on the first call of virtual tokens)."""
    position = kw.get("cache_position")
    if position is None:
        return
    if first:
        steps = torch.arange(n, device=position.device, dtype=position.dtype)
        kw["cache_position"] = torch.cat([steps, position + n])
    else:
        kw["cache_position"] = position + n


def cached_length(cache: Any) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        raise ValueError(
            f"the KV cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}"
        )
    return int(get())


def _batch_and_length(kw: dict[str, Any]) -> tuple[int, int, torch.device]:
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        raise ValueError("the model was called without input_ids or inputs_embeds")
    return int(ref.shape[0]), int(ref.shape[1]), ref.device


def _extend_mask(
    kw: dict[str, Any], n: int, batch: int, length: int, device: torch.device, at: int = 0
) -> None:
    """Insert ``n`` ones at index ``at`` of the 2D attention mask (made of ones if there is none)."""
    mask = kw.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if mask.dim() != 2:
        raise ValueError(
            "virtual tokens and prefixes need a 2D attention mask (batch, length), "
            f"got shape {tuple(mask.shape)}"
        )
    ones = mask.new_ones(mask.shape[0], n)
    kw["attention_mask"] = torch.cat([mask[:, :at], ones, mask[:, at:]], dim=1)


def forward_with_virtual_tokens(
    body: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], prompts: torch.Tensor, at: int = 0
) -> Any:
    """``body(*args, **kwargs)`` with the ``(n, hidden)`` vectors ``prompts`` inserted before input
    position ``at`` (0: before everything; 1: after a leading [CLS])."""
    kw = call_arguments(body, args, kwargs)
    n = int(prompts.shape[0])
    batch, length, device = _batch_and_length(kw)
    name, cache = _take_cache(body, kw)
    first = cached_length(cache) == 0
    past = 0 if first else cached_length(cache) - n
    _put_cache(body, kw, name, cache)
    _shift_cache_position(kw, n, first=first)
    if first:
        if length < at:
            raise ValueError(
                f"virtual tokens go after input position {at}, but the input has {length} tokens"
            )
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = body.get_input_embeddings()(kw["input_ids"])  # type: ignore[operator]
        virtual = prompts.to(device=embeds.device, dtype=embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kw["inputs_embeds"] = torch.cat([embeds[:, :at], virtual, embeds[:, at:]], dim=1)  # (B, n + T, D)
        kw["input_ids"] = None
        types = kw.get("token_type_ids")
        if types is not None:
            zeros = types.new_zeros(types.shape[0], n)
            kw["token_type_ids"] = torch.cat([types[:, :at], zeros, types[:, at:]], dim=1)
    positions = kw.get("position_ids")
    if positions is not None:
        shifted = positions + n
        if first:
            lead = positions[..., :at]
            start = lead[..., -1:] + 1 if at > 0 else torch.zeros_like(positions[..., :1])
            steps = torch.arange(n, device=positions.device, dtype=positions.dtype)
            shifted = torch.cat([lead, start + steps, positions[..., at:] + n], dim=-1)
        kw["position_ids"] = shifted
    if kw.get("attention_mask") is not None:
        _extend_mask(kw, n, batch, past + length, device, at)
    out = body(**kw)
    if first:
        _cut(out, n, at)
    return out


def _cut(out: Any, n: int, at: int) -> None:
    """Drop the ``n`` virtual positions (from index ``at``) from the per-token outputs of ``body``."""

    def cut(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h[:, :at], h[:, at + n :]], dim=1) if at > 0 else h[:, n:]

    last = getattr(out, "last_hidden_state", None)
    if isinstance(last, torch.Tensor):
        out.last_hidden_state = cut(last)
    states = getattr(out, "hidden_states", None)
    if isinstance(states, tuple):
        out.hidden_states = tuple(cut(h) for h in states)


def forward_with_prefix(
    body: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    prefixes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    offset: int = 0,
) -> Any:
    """``body(*args, **kwargs)`` with per-layer ``(keys, values)``, each ``(n, kv_heads, head_dim)``,
    before the keys and values of the real tokens. ``offset`` is added to the real tokens'
    positions (given or counted from 0): ``n`` numbers them after the prefix, as PEFT does."""
    from transformers import DynamicCache

    kw = call_arguments(body, args, kwargs)
    n = int(prefixes[0][0].shape[0])
    batch, length, device = _batch_and_length(kw)
    name = require_cache_keyword("prefix tuning", body)
    cache = _take_cache(body, kw)[1]
    first = cached_length(cache) == 0
    past = 0 if first else cached_length(cache) - n
    if first:
        if cache is None:
            cache = DynamicCache(config=body.config)  # type: ignore[arg-type]
        dtype = embedding_of(body).weight.dtype
        for layer, (keys, values) in enumerate(prefixes):
            # (n, H, d) -> (B, H, n, d), the cache's layout
            k = keys.to(device=device, dtype=dtype).permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
            v = values.to(device=device, dtype=dtype).permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(k, v, layer)
    kw[name] = cache
    if kw.get("position_ids") is None:
        positions = torch.arange(past, past + length, device=device)
        kw["position_ids"] = positions.unsqueeze(0).expand(batch, -1)
    if offset:
        kw["position_ids"] = kw["position_ids"] + offset
    _shift_cache_position(kw, n, first=False)
    _extend_mask(kw, n, batch, past + length, device)
    before = cached_length(cache)
    out = body(**kw)
    if cached_length(cache) == before:
        raise RuntimeError(
            f"prefix tuning: {type(body).__name__} did not use the prefix cache passed as `{name}` "
            "(its attention never read it), so the prefix would have no effect; this transformers "
            "release or model class does not take a prefix this way"
        )
    return out
