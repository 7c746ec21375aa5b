"""Partial fine-tuning: the last N blocks train exactly as in plain fine-tuning of those blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune as dt
from test_anatomy import LAYERS, tiny_bert, tiny_llama


def test_targets_are_the_last_blocks_and_counts() -> None:
    model = tiny_bert()
    att = dt.inject(model, dt.Partial(blocks=2))
    assert att.info("default").targets == ("bert.encoder.layer.1", "bert.encoder.layer.2")
    per_block = sum(p.numel() for p in model.bert.encoder.layer[0].parameters())  # type: ignore[union-attr]
    assert att.closed_form("default") == (2 * per_block, 4 * 2 * per_block)
    assert sum(p.numel() for p in dt.trainable_parameters(model)) == 2 * per_block


def test_field_errors() -> None:
    with pytest.raises(ValueError, match=rf"Partial.blocks must be <= the {LAYERS} blocks"):
        dt.inject(tiny_bert(), dt.Partial(blocks=LAYERS + 1))
    with pytest.raises(ValueError, match=r"Partial.blocks must equal the number of targeted blocks \(1"):
        dt.inject(tiny_bert(), dt.Partial(blocks=2), targets=["bert.encoder.layer.0"])
    with pytest.raises(ValueError, match=r"Partial.blocks must be an integer >= 1"):
        dt.Partial(blocks=0)
    model = tiny_bert()
    dt.inject(model, dt.LoRA(rank=2), targets=["query"])
    with pytest.raises(ValueError, match=r"'bert.encoder.layer.2' already contains adapted modules"):
        dt.inject(model, dt.Partial(blocks=1), name="top")


def test_same_steps_as_plain_fine_tuning_of_the_top_blocks() -> None:
    ids = torch.randint(1, 100, (4, 6))
    labels = torch.tensor([0, 1, 1, 0])

    plain = tiny_bert()
    for p in plain.parameters():
        p.requires_grad_(False)
    top = [p for i in (1, 2) for p in plain.bert.encoder.layer[i].parameters()]  # type: ignore[union-attr]
    for p in top:
        p.requires_grad_(True)

    model = tiny_bert()
    dt.inject(model, dt.Partial(blocks=2))
    ours = dt.trainable_parameters(model)
    assert [p.shape for p in ours] == [p.shape for p in top]

    for params, net in ((top, plain), (ours, model)):
        opt = torch.optim.SGD(params, lr=0.1)
        for _ in range(3):
            net(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(ours, top, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    expected = plain(input_ids=ids).logits
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)
    merged = dt.merge(model)
    assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    fresh = tiny_bert()
    first_merged, first_fresh = merged.bert.encoder.layer[0], fresh.bert.encoder.layer[0]  # type: ignore[union-attr]
    bottom = zip(first_merged.parameters(), first_fresh.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in bottom)  # the bottom block never moved


def test_bf16_base_keeps_float32_master_weights_and_exact_init() -> None:
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(1, 100, (2, 5))
    base = model(input_ids=ids).logits
    dt.inject(model, dt.Partial(blocks=1))
    assert all(p.dtype == torch.float32 for p in dt.trainable_parameters(model))
    assert torch.equal(model(input_ids=ids).logits, base)
    model(input_ids=ids).logits.float().sum().backward()
    assert all(p.grad is not None for p in dt.trainable_parameters(model))
    merged = dt.merge(model)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())


def test_save_load_stores_weights_only(tmp_path: Path) -> None:
    model = tiny_bert()
    dt.inject(model, dt.Partial(blocks=1))
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.01)
    ids = torch.randint(1, 100, (2, 5))
    expected = model(input_ids=ids).logits
    dt.save(model, tmp_path)
    fresh = tiny_bert()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(input_ids=ids).logits, expected)
    state = dt.adapter_state(fresh, "default")
    assert len(state) == len(list(tiny_bert().bert.encoder.layer[2].parameters()))  # type: ignore[union-attr]
