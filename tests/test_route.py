"""Per-example adapters through a whole generation loop: ``generate()`` inside one ``route`` block
(prefill with several tokens per row, then one token per step, the stacked factors kept for the
block) gives each row the tokens it gets alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune import wrapper

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama() -> LlamaForCausalLM:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM(config)
        model.eval()
        return model


def test_generate_inside_one_route_block_equals_each_row_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama()
    for i, rank in enumerate((2, 4, 8)):
        dt.inject(model, dt.LoRA(rank=rank, alpha=2 * rank), targets=TARGETS, name=f"a{i}", seed=i)
        with torch.no_grad():
            for layer in dt.attachment_of(model).layers(f"a{i}").values():
                layer.lora_B.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(10 + i))  # type: ignore[operator]
    names = ["a0", "a1", None, "a2", "a1"]
    ids = torch.randint(1, 64, (len(names), 6), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    built: list[int] = []
    stacked = wrapper._stacked

    def counting(*args: Any) -> Any:
        built.append(1)
        return stacked(*args)

    monkeypatch.setattr(wrapper, "_stacked", counting)
    with dt.route(model, names):
        routed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert len(built) == 2 * len(TARGETS)  # once per module for the 9 forwards of the block
    alone = []
    for i, name in enumerate(names):
        row = ids[i : i + 1]
        with dt.route(model, [name]):
            alone.append(model.generate(input_ids=row, attention_mask=torch.ones_like(row), **kwargs))
    assert torch.equal(routed, torch.cat(alone))
    # (the adapters matter: the same prompt under each gives different continuations)
    same = ids[:1].expand(4, -1)
    with dt.route(model, ["a0", "a1", "a2", None]):
        continued = model.generate(input_ids=same, attention_mask=torch.ones_like(same), **kwargs)
    assert len({tuple(row[6:].tolist()) for row in continued}) > 2
