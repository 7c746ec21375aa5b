"""4-bit bases: QLoRA on NF4 (torchao), merge rules, and QPiSSA's lower quantisation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.formats.io import read_tensors
from deltatune.methods.lowrank.lora import LoRALayer
from deltatune.runtime.state import load_adapter_state

pytest.importorskip("torchao")
from deltatune.runtime.quant import NF4Linear, nf4_roundtrip, quantization_error, quantize


def net(seed: int = 0) -> nn.Sequential:
    """Weights with a few large principal directions (as trained weights have) plus noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            out_f, in_f = lin.weight.shape
            spikes = torch.randn(out_f, 4, generator=g) @ torch.randn(4, in_f, generator=g)
            lin.weight.copy_(0.02 * torch.randn(out_f, in_f, generator=g) + 0.05 * spikes)
    return model.eval()


def test_quantize_replaces_linears_and_stays_close() -> None:
    model = net()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    before = model(x)
    W = model[0].weight.detach().clone()
    assert quantize(model) == ["0", "2"]
    assert isinstance(model[0], NF4Linear) and isinstance(model[2], NF4Linear)
    assert model[0].weight.__class__.__name__ == "NF4Tensor"
    err = float((model(x) - before).norm() / before.norm())  # (no grad needed)
    assert 0 < err < 0.25  # 4 bits: close, not equal (0.10 to 0.17 over 20 inputs)
    assert torch.allclose(model[0].dequantized_weight(), nf4_roundtrip(W))
    with pytest.raises(ValueError, match="'0' is already quantised"):
        quantize(model, ["0"])


@pytest.mark.parametrize("order", ["quantize-first", "inject-first"])
def test_qlora_trains_the_adapter_on_a_frozen_4bit_base(order: str) -> None:
    model = net()
    if order == "quantize-first":
        quantize(model)
        dt.inject(model, dt.LoRA(rank=4), targets=["0", "2"])
    else:
        dt.inject(model, dt.LoRA(rank=4), targets=["0", "2"])
        quantize(model)
    assert isinstance(model[0].base, NF4Linear)
    frozen = model[0].base.dequantized_weight().clone()
    opt = torch.optim.AdamW(dt.trainable_parameters(model), lr=1e-2)
    x, y = torch.randn(16, 64), torch.randn(16, 64)
    losses = []
    for _ in range(10):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert torch.equal(model[0].base.dequantized_weight(), frozen)
    out = model(x)
    with pytest.raises(ValueError, match=r"quantised base \(NF4Linear\).*dequantize=True"):
        dt.merge(model)
    merged = dt.merge(model, dequantize=True)
    assert type(merged[0]) is nn.Linear and type(merged[2]) is nn.Linear
    assert torch.allclose(merged(x), out, atol=1e-5)


def test_qpissa_quantisation_error_is_lower_than_qlora_and_iterations_help() -> None:
    W = net()[0].weight.detach().clone()
    qlora = float((W - nf4_roundtrip(W)).norm() / W.norm())
    errors = {}
    for iterations in (1, 5):
        model = net()
        dt.inject(model, dt.LoRA(rank=8, alpha=8, init=dt.PiSSA()), targets=["0"])
        quantize(model, ["0"], iterations=iterations)
        layer = dt.attachment_of(model).layers("default")["0"]
        assert isinstance(layer, LoRALayer) and layer.frozen_A is None  # the residual is in the base now
        errors[iterations] = quantization_error(W, model[0].base, layer.delta_weight())
    assert errors[1] < 0.8 * qlora
    assert errors[5] <= errors[1]


def test_qpissa_model_starts_at_the_quantised_approximation_and_trains() -> None:
    model = net()
    x = torch.randn(8, 64)
    reference = model(x)
    dt.inject(model, dt.LoRA(rank=8, init=dt.PiSSA()), targets=["0", "2"])
    quantize(model, iterations=2)
    qpissa_err = float((model(x) - reference).norm() / reference.norm())
    plain = net()
    quantize(plain)
    qlora_err = float((plain(x) - reference).norm() / reference.norm())
    assert qpissa_err < qlora_err
    model(x).sum().backward()
    assert all(p.grad is not None for p in dt.trainable_parameters(model))


def test_qpissa_adapter_saves_rank_r_and_reloads_on_the_same_quantised_residual(tmp_path: Path) -> None:
    def build() -> nn.Module:
        model = net()
        dt.inject(model, dt.LoRA(rank=4, init=dt.PiSSA()), targets=["0"])
        quantize(model, ["0"], iterations=2)
        return model

    model = build()
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.01)
    x = torch.randn(3, 64)
    dt.save(model, tmp_path)
    tensors = read_tensors(tmp_path / "adapter.safetensors")
    assert tensors["0.lora_A"].shape == (4, 64)
    again = build()
    load_adapter_state(again, "default", tensors, str(tmp_path))
    assert torch.equal(again(x), model(x))


def test_bad_input_is_refused() -> None:
    model = net()
    quantize(model, ["0"])
    with pytest.raises(ValueError, match="initialise the adapter first, then quantise"):
        dt.inject(model, dt.LoRA(rank=2, init=dt.PiSSA()), targets=["0"])
    trained = net()
    dt.inject(trained, dt.LoRA(rank=2, init=dt.PiSSA()), targets=["0"])
    with torch.no_grad():
        dt.trainable_parameters(trained)[0].add_(1.0)
    with pytest.raises(ValueError, match="has trained since it was initialised"):
        quantize(trained, ["0"])
    assert type(trained[0].base) is nn.Linear  # nothing was half-done
    odd = nn.Sequential(nn.Linear(10, 10))
    with pytest.raises(ValueError, match="'0' has 100 values, not a multiple of block_size=64"):
        quantize(odd)
    with pytest.raises(ValueError, match="pass scaler_block_size=None"):
        quantize(net(), scaler_block_size=256)  # 128 blocks
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        quantize(net(), iterations=0)
    with pytest.raises(ValueError, match="only nn.Linear"):
        quantize(nn.Sequential(nn.Embedding(64, 256)), ["0"])


def test_quantize_lets_the_float_weights_go() -> None:
    """Nothing keeps the float weights alive once their 4-bit copies replace them (the attachment
    remembers requires_grad flags by weak reference), so their memory is given back."""
    import gc
    import weakref

    model = net()
    dt.inject(model, dt.LoRA(rank=4), targets=["0"])
    weights = [weakref.ref(model[0].base.weight), weakref.ref(model[2].weight)]
    quantize(model)
    gc.collect()
    assert [w() for w in weights] == [None, None]
    dt.unload(model)  # the flags of the parameters still there come back; the dropped ones are gone
    assert isinstance(model[0], NF4Linear) and not any(p.requires_grad for p in model.parameters())
