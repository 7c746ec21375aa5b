"""Per-example adapters in one batch (``deltatune.route``): each row equals running it alone, in the
batched low-rank product and in the per-adapter gather, with gradients, in bf16, through a whole
``generate()`` in one block; the row table and the stacked factors are built once per block; adapters
are loaded and deleted while serving. (Every method that declares mixed batches is also checked by
the invariant suite's ``test_mixed_batch_routing``.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lowrank.lora import LoRA
from deltatune.runtime import routing, wrapper
from deltatune.runtime.wrapper import attachment_of
from toy_models import TOYS, llama_lm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def blocks() -> nn.Module:
    return TOYS[1].build()


def llama() -> Any:
    return llama_lm(64, 32, seed=0).eval()


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
    stacked = routing._stacked

    def counting(*args: Any) -> Any:
        built.append(1)
        return stacked(*args)

    monkeypatch.setattr(routing, "_stacked", counting)
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


def test_route_checks_batch_size() -> None:
    model = TOYS[0].build()
    dt.inject(model, LoRA(), targets=["fc1"])
    with (
        pytest.raises(ValueError, match="2 adapter names given for a batch of 3"),
        dt.route(model, ["default", None]),
    ):
        model(torch.randn(3, 16))
    with pytest.raises(ValueError, match="unknown adapter 'x'"), dt.route(model, ["x"]):
        pass


@pytest.mark.parametrize("tokens", [5, 1])
def test_route_builds_its_row_table_once_per_block(monkeypatch: pytest.MonkeyPatch, tokens: int) -> None:
    """The row table reaches the device once per route() block, not once per wrapper and forward (a
    blocking host-to-device copy each on a GPU): one slot per row for the batched low-rank product
    (5 tokens per row >= rank 2), or each adapter's rows for the per-adapter gather (1 token)."""
    model = blocks()
    dt.inject(model, LoRA(rank=2), targets=["q_proj", "v_proj"], name="a")
    dt.inject(model, LoRA(rank=2), targets=["q_proj", "v_proj"], name="b")
    made: list[object] = []
    original = torch.tensor

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        made.append(args[0])
        return original(*args, **kwargs)  # type: ignore[arg-type]

    x = torch.randn(4, tokens, 16)
    with dt.route(model, ["a", "b", None, "a"]):
        monkeypatch.setattr(torch, "tensor", counting)
        first = model(x)
        model(x)
        monkeypatch.setattr(torch, "tensor", original)
    assert made == ([[0, 1, 2, 0]] if tokens > 1 else [[0, 3], [1]])
    wrappers = sum(isinstance(m, dt.Adapted) for m in model.modules())
    assert wrappers > 2 and first.shape == x.shape


def _three_loras() -> nn.Module:
    """Blocks with LoRAs of ranks 2, 3 and 4 (different scales) on q and v, B trained-looking; the
    third also on k, where it is the only one."""
    model = blocks()
    for i, rank in enumerate((2, 3, 4)):
        targets = ["q_proj", "v_proj"] + (["k_proj"] if i == 2 else [])
        dt.inject(model, LoRA(rank=rank, alpha=i + 1.5), targets=targets, name=f"a{i}", seed=i)
        with torch.no_grad():
            for layer in attachment_of(model).layers(f"a{i}").values():
                layer.lora_B.normal_(0.0, 0.3)  # type: ignore[operator]
    return model


@pytest.mark.parametrize("tokens", [6, 1])  # the batched product, and the per-adapter gather
@pytest.mark.parametrize("grad", [False, True])
def test_route_equals_each_row_alone_in_both_paths(
    monkeypatch: pytest.MonkeyPatch, tokens: int, grad: bool
) -> None:
    """Mixed ranks and scales, base rows, and gradients: the batched product (one slot table, factors
    gathered per row, ranks padded) gives each row what running it alone gives."""
    model = _three_loras()
    names = ["a0", "a1", None, "a2", "a1", "a0", "a2"]
    x = torch.randn(len(names), tokens, 16)
    expected = []
    for i, name in enumerate(names):
        with torch.no_grad(), dt.route(model, [name]):
            expected.append(model(x[i : i + 1]))
    dt.set_active(model, ["a0", "a1", "a2"])  # all three train
    calls: list[int] = []
    batched = wrapper.add_batched
    monkeypatch.setattr(wrapper, "add_batched", lambda *a: calls.append(1) or batched(*a))
    with torch.set_grad_enabled(grad), dt.route(model, names):
        mixed = model(x)
    # q and v of both blocks hold two or more LoRAs; under autograd, one token per row gathers rows
    assert len(calls) == (0 if grad and tokens == 1 else 4)
    assert torch.allclose(mixed, torch.cat(expected), atol=1e-5)
    if not grad:
        return
    mixed.square().sum().backward()
    params = dt.trainable_parameters(model)
    routed = [p.grad for p in params]
    for p in params:
        p.grad = None
    for i, name in enumerate(names):
        if name is not None:  # (a base row has no gradient to give)
            with dt.route(model, [name]):
                model(x[i : i + 1]).square().sum().backward()
    for p, g in zip(params, routed, strict=True):
        assert g is not None and p.grad is not None
        assert torch.allclose(g, p.grad, atol=1e-4)


def test_route_keeps_stacked_factors_for_the_block_while_they_are_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Serving, a block stacks each module's factors once for all its forwards (a generation loop); an
    in-place change of a factor inside the block is seen at once; the stacks go with the block."""
    model = _three_loras().eval()
    names = ["a0", "a1", "a2", None]
    x = torch.randn(4, 1, 16)
    built: list[int] = []
    stacked = routing._stacked
    monkeypatch.setattr(routing, "_stacked", lambda *a: built.append(1) or stacked(*a))
    with torch.no_grad(), dt.route(model, names):
        first = model(x)
        assert len(built) == 4  # q and v of both blocks
        assert torch.equal(model(x), first) and len(built) == 4
        layer = attachment_of(model).layers("a1")["layers.0.v_proj"]
        layer.lora_B.mul_(2.0)  # type: ignore[operator]
        changed = model(x)
        assert len(built) == 5
        table = attachment_of(model).switch.routing
    assert table is not None and attachment_of(model).switch.routing is None
    dt.set_active(model, "a1")
    with torch.no_grad():
        assert torch.allclose(changed[1], model(x[1:2])[0], atol=1e-6)
        assert not torch.allclose(changed[1], first[1])
    assert torch.allclose(changed[0::2], first[0::2], atol=1e-6)


def test_route_batched_in_bfloat16_stays_bfloat16() -> None:
    model = _three_loras().to(torch.bfloat16)
    names = ["a0", "a1", "a2", None]
    x = torch.randn(4, 6, 16, dtype=torch.bfloat16)
    with dt.route(model, names), torch.no_grad():
        mixed = model(x)
    assert mixed.dtype == torch.bfloat16
    model32 = model.float()
    with dt.route(model32, names), torch.no_grad():
        reference = model32(x.float())
    assert torch.allclose(mixed.float(), reference, atol=0.05, rtol=0.05)


def test_adapters_swap_in_and_out_while_serving(tmp_path: Path) -> None:
    """Hot-swap: a saved adapter is loaded into a model that serves others, routed in the next batch,
    and another is deleted; the outputs of the rest do not move (beyond rounding) and nothing is
    re-injected."""
    model = blocks()
    dt.inject(model, LoRA(rank=2), targets=["q_proj", "v_proj"], name="a", seed=1)
    dt.inject(model, LoRA(rank=2), targets=["q_proj", "v_proj"], name="b", seed=2)
    with torch.no_grad():
        for i, name in enumerate(("a", "b")):
            for layer in attachment_of(model).layers(name).values():
                layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    trained = blocks()
    dt.inject(trained, LoRA(rank=4), targets=["q_proj"], name="c", seed=3)
    with torch.no_grad():
        for layer in attachment_of(trained).layers("c").values():
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    dt.save(trained, tmp_path / "c")
    x = torch.randn(3, 5, 16)
    model.eval()
    wrappers = {p: w for p, w in attachment_of(model).wrappers.items()}
    with torch.no_grad():
        with dt.route(model, ["a", "b", "a"]):
            before = model(x)
        dt.load(model, tmp_path / "c", activate=False)
        with dt.route(model, ["a", "b", "c"]):
            after = model(x)
        expected_c = trained.eval()(x[2:3])
        dt.delete_adapter(model, "b")
        with dt.route(model, ["a", "c", "a"]):
            later = model(x)
    # (within rounding: the batched product pads every row to the largest rank at the module)
    assert torch.allclose(after[:2], before[:2], atol=1e-6)
    assert torch.allclose(after[2:], expected_c, atol=1e-6)
    assert torch.allclose(later[0::2], before[0::2], atol=1e-6)
    assert all(attachment_of(model).wrappers[p] is w for p, w in wrappers.items())
