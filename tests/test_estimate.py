"""deltatune.runtime.estimate against a real training step on CPU, on two model shapes.

Measured: autograd's saved tensors counted once per storage (weights apart), plus every parameter and
buffer, the gradients after backward and AdamW's state after one step. The estimate (a trace on the
meta device) must be within 15 % of it for each configuration, and its FLOPs equal the real step's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import deltatune as dt
from deltatune.runtime.estimate import Estimate, Kept, estimate, kept_by_step, meta_model, model_config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

BATCH, SEQ = 4, 24


def tiny_bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"  # (CPU's fused attention kernel is not counted by FlopCounterMode)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def tiny_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=120,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


SHAPES = {"bert": tiny_bert, "llama": tiny_llama}
CONFIGS: dict[str, Any] = {
    "lora": dt.LoRA(rank=4, alpha=8),
    "vblora": dt.VBLoRA(rank=2, num_vectors=16, vector_length=8),
    "dora": dt.DoRA(rank=4, alpha=8),
    "prompt": dt.PromptTuning(num_virtual_tokens=6),
    "full": "full",
}


def measure(model: nn.Module, method: Any) -> dict[str, int]:
    """The real step's memory terms and FLOPs, on CPU."""
    net = copy.deepcopy(model)
    classifier = isinstance(net, transformers.BertForSequenceClassification)
    heads = ["classifier"] if classifier else None
    if method == "full":
        net.requires_grad_(True)
    else:
        net.requires_grad_(False)
        dt.inject(net, method, modules_to_save=heads)
    net.train()
    ids = torch.randint(0, 120, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(BATCH, dtype=torch.long) if classifier else ids
    weights = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    with FlopCounterMode(display=False) as flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    state_bytes = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for k, v in s.items()
        if isinstance(v, torch.Tensor) and k != "step"
    )
    return {
        "weights": sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()]),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None),
        "optimizer": state_bytes,
        "activations": sum(saved.values()),
        "flops": flops.get_total_flops(),
    }


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_estimate_is_within_15_percent_of_a_real_step(shape: str, config: str) -> None:
    model = SHAPES[shape]()
    got = estimate(model, CONFIGS[config], batch=BATCH, seq=SEQ)
    real = measure(model, CONFIGS[config])
    total = real["weights"] + real["gradients"] + real["optimizer"] + real["activations"]
    assert got.total_bytes == pytest.approx(total, rel=0.15)
    assert got.activation_bytes == pytest.approx(real["activations"], rel=0.15)
    assert got.gradient_bytes == real["gradients"] and got.optimizer_bytes == real["optimizer"]
    assert got.weight_bytes == real["weights"]
    assert got.flops == real["flops"]
    assert next(model.parameters()).device.type == "cpu"  # the model given is left as it was


def test_floor_full_and_adapter_order() -> None:
    model = tiny_llama()
    floor = estimate(model, "floor", batch=BATCH, seq=SEQ)
    full = estimate(model, "full", batch=BATCH, seq=SEQ)
    lora = estimate(model, dt.LoRA(rank=4), batch=BATCH, seq=SEQ)
    assert floor.trainable_parameters == 0 and floor.gradient_bytes == 0
    assert full.trainable_parameters == sum(p.numel() for p in model.parameters())
    assert floor.flops < lora.flops < full.flops
    assert lora.optimizer_bytes == 2 * lora.gradient_bytes
    assert lora.stored_bytes == dt.inject(copy.deepcopy(model), dt.LoRA(rank=4)).closed_form("default")[1]
    assert isinstance(lora.to_dict()["total_bytes"], int)


def test_concurrent_estimates_agree_and_leave_torch_as_it_was() -> None:
    """The meta-device autocast patch is shared by overlapping traces and undone by the last one."""
    from concurrent.futures import ThreadPoolExecutor

    autocast, enabled = torch.autocast, torch.is_autocast_enabled
    model = tiny_llama()
    alone = estimate(model, dt.LoRA(rank=4), batch=BATCH, seq=SEQ)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: estimate(model, dt.LoRA(rank=4), batch=BATCH, seq=SEQ), range(3)))
    assert all(r == alone for r in results)
    assert torch.autocast is autocast and torch.is_autocast_enabled is enabled


def test_named_shapes_estimate_without_weights() -> None:
    model = meta_model("smollm2-135m")
    assert all(p.device.type == "meta" for p in model.parameters())
    floor = estimate(model, "floor", batch=1, seq=16)
    lora = estimate(model, dt.LoRA(rank=16, alpha=32), batch=1, seq=16)
    assert isinstance(lora, Estimate)
    assert lora.trainable_parameters == 4_884_480  # 30 layers x 7 projections x 16 x (in + out)
    assert 1.0 < lora.flops / floor.flops < 1.1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: model_config("gpt-17"), "unknown model shape 'gpt-17': use one of"),
        (
            lambda: estimate(tiny_llama(), dt.LoRA(), batch=0, seq=8),
            "estimate: batch must be an integer >= 1",
        ),
        (lambda: estimate(tiny_llama(), "lora", batch=1, seq=8), "method must be a method config"),
        (lambda: estimate(tiny_llama(), "head", batch=1, seq=8), "method 'head' needs a classifier"),
        (lambda: estimate(tiny_llama(), dt.LoRA(), targets=["nope"], batch=1, seq=8), "nope"),
    ],
)
def test_bad_input(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli.main import main

    tiny_llama().config.save_pretrained(tmp_path)
    assert (
        main(["estimate", "--model", str(tmp_path), "--method", "lora", "--rank", "4", "--batch", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert "| frozen-base floor | 0 |" in out and "| full fine-tuning |" in out and "| lora rank=4 |" in out
    assert main(["estimate", "--model", str(tmp_path), "--method", "dora", "--json", "--seq", "8"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows][:2] == ["frozen-base floor", "full fine-tuning"]
    assert rows[2]["seq"] == 8 and rows[2]["flops"] > rows[0]["flops"]
    assert main(["estimate", "--model", "gpt-17"]) == 2
    assert "unknown model shape 'gpt-17'" in capsys.readouterr().err
    assert main(["estimate", "--model", str(tmp_path), "--rank", "0"]) == 2
    assert "LoRA.rank must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_four_bit_base_is_counted_at_what_nf4_stores(shape: str) -> None:
    """estimate(..., quantize="nf4") gives the weight bytes of the model really quantised (every
    linear layer but the heads in NF4, the scales included), with LoRA on top and without."""
    pytest.importorskip("torchao")
    from deltatune.runtime.quant import quantize
    from deltatune.runtime.quantized_base import weight_bytes

    for method in ("floor", dt.LoRA(rank=4)):
        model = SHAPES[shape]()
        est = estimate(model, method, batch=BATCH, seq=SEQ, quantize="nf4")
        plain = estimate(model, method, batch=BATCH, seq=SEQ)
        real = copy.deepcopy(model)
        if not isinstance(method, str):
            dt.inject(real, method, modules_to_save=[n for n in ("classifier",) if hasattr(real, n)])
        quantize(real)
        assert est.weight_bytes == weight_bytes(real), method
        assert est.weight_bytes < plain.weight_bytes
        assert (est.activation_bytes, est.flops) == (plain.activation_bytes, plain.flops)
    with pytest.raises(ValueError, match="quantize must be 'nf4' or None"):
        estimate(SHAPES[shape](), "floor", batch=BATCH, seq=SEQ, quantize="int4")


def smollm2_layers(layers: int) -> nn.Module:
    """SmolLM2-135M's shape (widths, heads, grouped KV, vocabulary) with fewer blocks: each block keeps
    the same activations per token as in the full model, so the attention share is the real one."""
    cfg = model_config("smollm2-135m")
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def real_step(
    model: nn.Module, method: Any, batch: int, seq: int, attention: str, checkpointed: bool = False
) -> Kept:
    """What autograd keeps in a real CPU step (:func:`kept_by_step`, the estimator's rule: each storage
    once, weights apart), by block; ``checkpointed``: every block checkpointed."""
    from deltatune import anatomy
    from deltatune.runtime.checkpointing import checkpoint_blocks

    net: Any = copy.deepcopy(model)
    net.set_attn_implementation(attention)
    net.requires_grad_(method == "full")
    if not isinstance(method, str):
        dt.inject(net, method, targets="all-linear")
    blocks = [net.get_submodule(p) for p in anatomy.describe(net).blocks]
    if checkpointed:
        checkpoint_blocks(net)
    net.train()
    ids = torch.randint(0, net.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def forward() -> torch.Tensor:
        if method == "floor":
            embeds = net.get_input_embeddings()(ids).detach().requires_grad_(True)
            return net(inputs_embeds=embeds, labels=ids).loss
        return net(input_ids=ids, labels=ids).loss

    kept, loss = kept_by_step(net, forward, blocks)
    loss.backward()
    return kept


LENGTH_CONFIGS: dict[str, Any] = {
    "floor": "floor",
    "lora": dt.LoRA(rank=16, alpha=32),
    "dora": dt.DoRA(rank=16, alpha=32),
    "full": "full",
}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("seq", [256, 1024, pytest.param(2048, marks=pytest.mark.slow)])
def test_activations_follow_the_attention_kernel_at_real_lengths(attention: str, seq: int) -> None:
    """At lengths where attention matters, the estimate of each configuration is within 10 % of a
    real step with the same attention (sdpa keeps O(T) per head, eager the T x T probabilities)."""
    model = smollm2_layers(2)
    batch = 2 if seq < 1024 else 1  # (from 1024 on, the T x T probabilities dominate at batch 1 too)
    for name, method in LENGTH_CONFIGS.items():
        targets = None if isinstance(method, str) else "all-linear"
        got = estimate(model, method, targets=targets, batch=batch, seq=seq, attention=attention)
        assert got.attention == attention and got.logits_dtype == "float32"
        real = real_step(model, method, batch, seq, attention).total
        assert got.activation_bytes == pytest.approx(real, rel=0.10), name


def test_the_default_is_the_configured_attention_and_eager_keeps_the_probabilities() -> None:
    model = meta_model("smollm2-135m")
    sdpa = estimate(model, "floor", batch=2, seq=1024)
    eager = estimate(model, "floor", batch=2, seq=1024, attention="eager")
    assert sdpa.attention == "sdpa" and model.config._attn_implementation == "sdpa"  # left as it was
    cfg = model_config("smollm2-135m")
    probabilities = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * 1024 * 1024 * 4
    # eager keeps each layer's probabilities (and its dropout's input: the same storage, once)
    assert eager.activation_bytes - sdpa.activation_bytes >= probabilities
    assert (
        estimate(model, "floor", batch=2, seq=1024, attention="flash").activation_bytes
        == sdpa.activation_bytes
    )
    with pytest.raises(ValueError, match="attention must be one of eager, sdpa, flash, got 'xformers'"):
        estimate(model, "floor", batch=2, seq=64, attention="xformers")


@pytest.mark.parametrize("seq", [256, pytest.param(1024, marks=pytest.mark.slow)])
def test_activations_under_checkpointing_match_a_real_checkpointed_step(seq: int) -> None:
    """Per-block checkpointing keeps what a real checkpointed step keeps outside the blocks (autograd
    sees nothing inside them), the blocks' inputs, and in backward one block's recomputation (the
    largest of a real plain step's): the estimate is within 10 % of that sum, and well below the plain
    estimate."""
    model = smollm2_layers(3)
    for name, method in LENGTH_CONFIGS.items():
        targets = None if isinstance(method, str) else "all-linear"
        got = estimate(model, method, targets=targets, batch=2, seq=seq, activation_checkpointing=True)
        plain = estimate(model, method, targets=targets, batch=2, seq=seq)
        real = real_step(model, method, 2, seq, "sdpa", checkpointed=True)
        assert real.largest_block() == 0, name  # nothing inside a checkpointed block is kept
        recomputed = real_step(model, method, 2, seq, "sdpa").largest_block()
        expected = real.outside() + sum(real.inputs.values()) + recomputed
        assert got.activation_checkpointing and got.activation_bytes == pytest.approx(expected, rel=0.10), (
            name
        )
        assert got.activation_bytes < 0.85 * plain.activation_bytes, name
        # every block's forward again in backward: more backward FLOPs, the same forward
        assert got.forward_flops == plain.forward_flops and got.backward_flops > plain.backward_flops
