"""PEFT's prompt-learning types: ``PROMPT_TUNING``, ``PREFIX_TUNING`` and ``P_TUNING``.

PEFT stores the values the model reads as one ``prompt_embeddings`` tensor: the prompts, or the
prefixes of every layer (through an MLP or an LSTM while training, the file holds their output).
PEFT runs such an adapter only inside the PeftModel of its task, so its config carries a
``task_type``, read here off the model's class (None when it has none: the caller must give it).
Their configs are not checked field by field: each translator reads the fields it needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...contract import Method
from ...methods.prompts.p_tuning import PTuning
from ...methods.prompts.prefix_tuning import _DEFAULT_HIDDEN, PrefixTuning
from ...methods.prompts.prompt_tuning import PromptTuning
from ...methods.prompts.virtual import attention_shape, body_paths, config_of, embedding_of
from ...runtime.state import adapter_state
from ...runtime.wrapper import Attachment
from .fields import expect

PREFIX = "base_model."

#: PEFT's task type of a transformers model, by the ending of its class name. PEFT runs a
#: prompt-learning adapter only inside the PeftModel of its task (a plain PeftModel ignores it).
PEFT_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


def prompt_tuning_from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[PromptTuning, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """PEFT's prompt (``prompt_embeddings``), first in the input as PEFT puts it. PEFT's
    ``prompt_tuning_init`` is not carried over: the loaded prompt replaces any init."""
    path, prompts = _prompt_tensor(config, tensors, model)
    method = PromptTuning(num_virtual_tokens=int(config["num_virtual_tokens"]))
    return method, [path], {}, {f"{path}.prompts": prompts}


def prompt_tuning_to_peft(
    method: Method, attachment: Attachment, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's prompt-tuning config and ``prompt_embeddings``."""
    prompt = expect(method, PromptTuning)
    if prompt.insert_at != 0:
        raise ValueError(f"PEFT puts the prompt first; insert_at={prompt.insert_at} has no PEFT equivalent")
    path, config = _body_config(attachment, name, prompt.num_virtual_tokens, key_value=False)
    config["prompt_tuning_init"] = "RANDOM"  # PEFT loads the stored prompt over it
    return config, {"prompt_embeddings": adapter_state(attachment.model, name)[f"{path}.prompts"]}


def prefix_tuning_from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[PrefixTuning, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """PEFT's prefixes (``prompt_embeddings``: n x L·2·d_kv, the MLP's output when PEFT trained
    through one), with ``positions="after_prefix"``, which reproduces PEFT's outputs."""
    path, prefixes = _prompt_tensor(config, tensors, model)
    mlp = bool(config.get("prefix_projection", False))
    hidden = int(config.get("encoder_hidden_size") or _DEFAULT_HIDDEN) if mlp else _DEFAULT_HIDDEN
    method = PrefixTuning(
        num_virtual_tokens=int(config["num_virtual_tokens"]),
        reparameterize=mlp,
        encoder_hidden_size=hidden,
        positions="after_prefix",
    )
    return method, [path], {}, {f"{path}.prefixes": prefixes}


def prefix_tuning_to_peft(
    method: Method, attachment: Attachment, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's prefix-tuning config and the (collapsed) prefixes as ``prompt_embeddings``."""
    prefix = expect(method, PrefixTuning)
    if prefix.positions != "after_prefix":
        raise ValueError(
            "PEFT numbers the real tokens after the prefix (positions n, n+1, ...) and this adapter "
            "from 0 (positions='base'), so PEFT would compute other outputs; an adapter trained with "
            "PrefixTuning(positions='after_prefix') exports"
        )
    path, config = _body_config(attachment, name, prefix.num_virtual_tokens, key_value=True)
    hidden = prefix.encoder_hidden_size if prefix.reparameterize else config["token_dim"]
    config.update(prefix_projection=prefix.reparameterize, encoder_hidden_size=hidden)
    return config, {"prompt_embeddings": adapter_state(attachment.model, name)[f"{path}.prefixes"]}


def p_tuning_from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[PTuning, list[str], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """PEFT's P-tuning file holds, like ours, the encoder's output (``prompt_embeddings``, n x d),
    not the encoder: it loads as plain virtual tokens. ``encoder_num_layers`` and
    ``encoder_dropout`` describe only that training-time encoder, so they do not matter here."""
    path, prompts = _prompt_tensor(config, tensors, model)
    method = PTuning(
        num_virtual_tokens=int(config["num_virtual_tokens"]),
        encoder=str(config.get("encoder_reparameterization_type", "MLP")).lower(),
        encoder_hidden_size=int(config.get("encoder_hidden_size") or 128),
    )
    return method, [path], {}, {f"{path}.prompts": prompts}


def p_tuning_to_peft(
    method: Method, attachment: Attachment, name: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's P-tuning config and the encoder's output as ``prompt_embeddings``, which PEFT's
    loader (``inference_mode``) uses as the prompt."""
    prompt = expect(method, PTuning)
    if prompt.insert_at != 0:
        raise ValueError(f"PEFT puts the prompt first; insert_at={prompt.insert_at} has no PEFT equivalent")
    path, config = _body_config(attachment, name, prompt.num_virtual_tokens, key_value=False)
    config.update(
        encoder_reparameterization_type=prompt.encoder.upper(),
        encoder_hidden_size=prompt.encoder_hidden_size,
        encoder_num_layers=2,
        encoder_dropout=0.0,
    )
    return config, {"prompt_embeddings": adapter_state(attachment.model, name)[f"{path}.prompts"]}


def _body_config(attachment: Attachment, name: str, n: int, *, key_value: bool) -> tuple[str, dict[str, Any]]:
    """(the adapted body's path, the fields every PEFT prompt-learning config has) for ``n``
    virtual tokens on it.

    ``token_dim`` and ``num_attention_heads`` are the hidden size and heads (prompts), or the
    key/value width and heads (``key_value``: prefixes; PEFT's grouped-query layout).
    """
    path = attachment.info(name).targets[0]
    body = attachment.wrappers[path].base
    config = config_of("export_peft", body, "")
    layers, kv_heads, head_dim = attention_shape("export_peft", config)
    model = type(attachment.model).__name__
    return path, {
        "task_type": next((t for end, t in PEFT_TASK_TYPES.items() if model.endswith(end)), None),
        "num_virtual_tokens": n,
        "token_dim": kv_heads * head_dim if key_value else embedding_of(body).embedding_dim,
        "num_attention_heads": kv_heads if key_value else int(config.num_attention_heads),
        "num_layers": layers,
        "num_transformer_submodules": 1,
    }


def _prompt_tensor(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[str, torch.Tensor]:
    """(the path of ``model``'s body, PEFT's ``prompt_embeddings``) of a prompt-learning file."""
    if config.get("num_transformer_submodules") not in (1, None):
        raise ValueError(
            f"num_transformer_submodules={config['num_transformer_submodules']!r} (an encoder-decoder "
            "model) is not supported: deltatune's prompts and prefixes go into one transformer body"
        )
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra or "prompt_embeddings" not in tensors:
        raise ValueError(
            f"expected one tensor 'prompt_embeddings' (and modules_to_save), found {extra or 'none'}"
        )
    bodies = body_paths(model)
    if not bodies:
        raise ValueError(f"{type(model).__name__} has no transformers body to put the virtual tokens in")
    return bodies[0], tensors["prompt_embeddings"]
