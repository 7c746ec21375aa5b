"""A tiny random Llama with a byte-level tokenizer and a ChatML chat template (SmolLM2's format),
saved as a local Hugging Face folder: the causal LM the data, chat and generate tests run on."""

from __future__ import annotations

from pathlib import Path

import torch

#: SmolLM2-Instruct's template, shortened: ChatML turns, a default system prompt when none is given.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_tiny_chat_llama(
    folder: Path, *, chat_template: str | None = CHATML, seed: int = 0, family: str = "llama"
) -> str:
    """Write the model and tokenizer to ``folder``; return its path. ``chat_template=None``: none.
    ``family``: "llama", or a MoE ("mixtral", "qwen3_moe") with 4 fused experts, 2 per token."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
    vocab = {**{s: i for i, s in enumerate(specials)}, **{c: i + 4 for i, c in enumerate(sorted(alphabet))}}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    shape = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    experts = {"num_experts_per_tok": 2}
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**shape),
        "mixtral": lambda: transformers.MixtralConfig(**shape, **experts, num_local_experts=4),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            **shape, **experts, num_experts=4, moe_intermediate_size=48, head_dim=16
        ),
    }[family]()
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
