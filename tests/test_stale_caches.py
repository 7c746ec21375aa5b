"""Issue 13, point 5: no stale caches, and shared state on the device of the modules it serves.

A cached value (VB-LoRA's built factors and its loaded top-k mixture, the intrinsic-dimension
projection, CorDA's covariances) must follow every change of what it was computed from: a
parameter re-assigned through ``.data`` (``torch.nn.utils.vector_to_parameters``), a dtype cast, a
device move, a rewritten file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import deltatune as dt
from deltatune.contract import REGISTRY, Method
from deltatune.runtime.wrapper import attachment_of


def _net(device: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16, device=device), nn.ReLU(), nn.Linear(16, 16, device=device))


def _methods() -> list[Any]:
    return [
        dt.VBLoRA(rank=2, num_vectors=8, vector_length=4),
        dt.IntrinsicDimension(d=40),
        dt.IntrinsicDimension(d=40, structure="did"),
    ]


def _eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


def _live_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """With autograd on: the cached values are neither read nor written."""
    with torch.enable_grad():
        out: torch.Tensor = model(x).detach()
    return out


@pytest.mark.parametrize(
    "method", _methods(), ids=lambda m: f"{type(m).__name__}-{getattr(m, 'structure', '')}"
)
def test_vector_to_parameters_reaches_cached_outputs(method: Any) -> None:
    model = _net()
    dt.inject(model, method, targets=["0", "2"])
    model.eval()
    x = torch.randn(3, 16)
    before = _eval_out(model, x)  # fills the caches
    params = dt.trainable_parameters(model)
    vec = parameters_to_vector(params)
    vector_to_parameters(
        vec + 0.05 * torch.randn(vec.shape, generator=torch.Generator().manual_seed(1)), params
    )
    after = _eval_out(model, x)
    assert not torch.equal(after, before)
    assert torch.equal(after, _live_out(model, x))


@pytest.mark.parametrize(
    "method", _methods(), ids=lambda m: f"{type(m).__name__}-{getattr(m, 'structure', '')}"
)
def test_data_assignment_of_each_parameter_reaches_cached_outputs(method: Any) -> None:
    model = _net()
    dt.inject(model, method, targets=["0", "2"])
    model.eval()
    x = torch.randn(3, 16)
    gen = torch.Generator().manual_seed(2)
    for p in dt.trainable_parameters(model):
        before = _eval_out(model, x)
        p.data = p.data + 0.1 * torch.randn(p.shape, generator=gen)
        after = _eval_out(model, x)
        assert not torch.equal(after, before), f"a parameter of shape {tuple(p.shape)} was re-assigned"
        assert torch.equal(after, _live_out(model, x))


def _loaded_vblora(tmp_path: Path) -> nn.Module:
    """A VB-LoRA adapter loaded from a top-k file (its stored mixture is used as it is)."""
    model = _net()
    dt.inject(model, dt.VBLoRA(rank=2, num_vectors=8, vector_length=4), targets=["0", "2"])
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    dt.save(model, tmp_path)
    fresh = _net()
    dt.load(fresh, tmp_path)
    return fresh


def test_loaded_topk_mixture_follows_reassigned_logits(tmp_path: Path) -> None:
    model = _loaded_vblora(tmp_path)
    x = torch.randn(3, 16)
    before = _live_out(model, x)
    layer: Any = attachment_of(model).layers("default")["0"]
    logits = layer.logits_A
    new = torch.randn(logits.shape, generator=torch.Generator().manual_seed(4))
    vector_to_parameters(new.flatten(), [logits])
    assert not torch.equal(_live_out(model, x), before)
    _top, indices = new.topk(2, dim=-1)
    stored = layer.export_state()
    assert torch.equal(stored["topk_indices_A"].long(), indices)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("loaded", [False, True], ids=["injected", "loaded-topk"])
def test_vblora_factors_follow_dtype_casts(tmp_path: Path, dtype: torch.dtype, loaded: bool) -> None:
    if loaded:
        model = _loaded_vblora(tmp_path)
    else:
        model = _net()
        dt.inject(model, dt.VBLoRA(rank=2, num_vectors=8, vector_length=4), targets=["0", "2"])
    model.eval()
    x = torch.randn(3, 16)
    _eval_out(model, x)  # fills the cache in float32
    model.to(dtype)
    layer = attachment_of(model).layers("default")["0"]
    with torch.no_grad():
        A, B = layer.factors()  # type: ignore[operator]
        assert A.dtype == dtype and B.dtype == dtype
        assert _eval_out(model, x.to(dtype)).dtype == dtype
    with torch.enable_grad():
        A2, B2 = layer.factors()  # type: ignore[operator]
    assert A2.dtype == dtype
    assert torch.equal(A, A2.detach()) and torch.equal(B, B2.detach())


@pytest.mark.parametrize(
    "method", _methods(), ids=lambda m: f"{type(m).__name__}-{getattr(m, 'structure', '')}"
)
def test_cached_outputs_follow_double(method: Any) -> None:
    model = _net()
    dt.inject(model, method, targets=["0", "2"])
    model.eval()
    x = torch.randn(3, 16)
    _eval_out(model, x)
    model.double()
    out = _eval_out(model, x.double())
    assert out.dtype == torch.float64
    assert torch.equal(out, _live_out(model, x.double()))


def _shared_methods() -> list[Any]:
    return [cls for cls in REGISTRY.values() if cls.make_shared is not Method.make_shared]


def test_some_methods_have_shared_state() -> None:
    assert {cls.name for cls in _shared_methods()} >= {"vblora", "intrinsic"}


@pytest.mark.parametrize("cls", _shared_methods(), ids=lambda c: c.name)
def test_shared_state_is_created_on_the_device_of_the_modules_it_serves(cls: Any) -> None:
    """On a model on the meta device (standing in for a GPU): the shared module and every layer
    are on meta, as they would be on cuda:0 for a model on the GPU."""
    model = _net(device="meta")
    method = cls(**cls.suite.example)
    att = dt.inject(model, method, targets=["0", "2"])
    shared = att.shared("default")
    assert shared is not None
    tensors = [*shared.parameters(), *shared.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    for layer in att.layers("default").values():
        assert all(t.device.type == "meta" for t in [*layer.parameters(), *layer.buffers()])


def test_cpu_model_keeps_everything_on_the_cpu() -> None:
    model = _net()
    att = dt.inject(model, dt.VBLoRA(rank=2, num_vectors=8, vector_length=4), targets=["0", "2"])
    shared = att.shared("default")
    assert shared is not None and all(p.device.type == "cpu" for p in shared.parameters())


def test_corda_covariances_are_read_again_when_the_file_changes(tmp_path: Path) -> None:
    """A rewritten covariance file is read again, even with the same size and modification time."""
    path = tmp_path / "cov.safetensors"
    gen = torch.Generator().manual_seed(5)
    first = {p: (lambda m: m @ m.t() + torch.eye(16))(torch.randn(16, 16, generator=gen)) for p in ("0", "2")}
    second = {
        p: (lambda m: m @ m.t() + torch.eye(16))(torch.randn(16, 16, generator=gen)) for p in ("0", "2")
    }
    save_file(first, str(path))
    stamp = os.stat(path)
    a = _net()
    dt.inject(a, dt.LoRA(rank=2, init=dt.CorDA(covariance=str(path))), targets=["0", "2"])
    save_file(second, str(path))
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    b = _net()
    dt.inject(b, dt.LoRA(rank=2, init=dt.CorDA(covariance=str(path))), targets=["0", "2"])
    c = _net()
    dt.inject(c, dt.LoRA(rank=2, init=dt.CorDA(covariance=str(path))), targets=["0", "2"])
    lora_a = [p for p in dt.trainable_parameters(a)]
    lora_b = [p for p in dt.trainable_parameters(b)]
    lora_c = [p for p in dt.trainable_parameters(c)]
    assert not torch.equal(lora_a[0], lora_b[0])
    assert all(torch.equal(p, q) for p, q in zip(lora_b, lora_c, strict=True))


@pytest.mark.parametrize("loaded", [False, True], ids=["injected", "loaded-topk"])
def test_vblora_factors_follow_device_moves(tmp_path: Path, loaded: bool) -> None:
    """A move (here to ``meta``) is seen: no factor built on the old device. (A move to a GPU re-assigns
    ``.data`` in place, keeping the parameter and its version: the ``.data`` tests above cover it.)"""
    if loaded:
        model = _loaded_vblora(tmp_path)
    else:
        model = _net()
        dt.inject(model, dt.VBLoRA(rank=2, num_vectors=8, vector_length=4), targets=["0", "2"])
    model.eval()
    _eval_out(model, torch.randn(3, 16))  # fills the cache on the CPU
    model.to("meta")
    for layer in attachment_of(model).layers("default").values():
        with torch.no_grad():
            A, B = layer.factors()  # type: ignore[operator]
        assert A.device.type == "meta" and B.device.type == "meta"


def test_intrinsic_projection_follows_device_moves() -> None:
    model = _net()
    dt.inject(model, dt.IntrinsicDimension(d=40), targets=["0", "2"])
    model.eval()
    _eval_out(model, torch.randn(3, 16))
    model.to("meta")
    for layer in attachment_of(model).layers("default").values():
        with torch.no_grad():
            assert layer.delta_weight().device.type == "meta"  # type: ignore[operator]
