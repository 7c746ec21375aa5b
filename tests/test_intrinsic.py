"""Intrinsic-dimension fine-tuning: the Walsh–Hadamard and Fastfood math, DID/SAID, storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.contract import SHARED_ATTR
from deltatune.methods.intrinsic import (
    IntrinsicLayer,
    IntrinsicVector,
    fastfood,
    fastfood_params,
    fwht,
    hadamard_matrix,
)


def sylvester(n: int) -> torch.Tensor:
    """The Hadamard matrix by its block recursion [[H, H], [H, -H]], independently of the library."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))


@pytest.mark.parametrize("n", [1, 2, 8, 64, 512])
@pytest.mark.parametrize("radix_bits", [1, 2, 5])
def test_fwht_is_the_dense_hadamard_product(n: int, radix_bits: int) -> None:
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    H = sylvester(n)
    assert torch.equal(hadamard_matrix(n, torch.float64), H)
    if n > 1:
        assert torch.equal(H, torch.kron(sylvester(2), sylvester(n // 2)))  # Sylvester = Kronecker
    assert torch.allclose(fwht(x, radix_bits=radix_bits), x @ H, atol=1e-9)
    # Its own inverse up to scaling: H H = n I.
    assert torch.allclose(fwht(fwht(x, radix_bits), radix_bits), n * x, atol=1e-9)


def test_fwht_refuses_a_length_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two, got 12"):
        fwht(torch.zeros(4, 12))
    with pytest.raises(ValueError, match="radix_bits must be >= 1"):
        fwht(torch.zeros(8), radix_bits=0)


def dense_fastfood(signs: torch.Tensor, perm: torch.Tensor, gauss: torch.Tensor) -> torch.Tensor:
    """Σ-stacked s_j H G_j Π_j H B_j as explicit matrices (k·L, L)."""
    k, L = gauss.shape
    H = sylvester(L)
    blocks = []
    for j in range(k):
        local = perm[j * L : (j + 1) * L].long() - j * L
        Pi = torch.zeros(L, L, dtype=torch.float64)
        Pi[torch.arange(L), local] = 1.0  # (Π x)_i = x_{perm(i)}
        G = torch.diag(gauss[j].double())
        B = torch.diag(signs[j].double())
        blocks.append(H @ G @ Pi @ H @ B)
    return torch.cat(blocks, 0)


def test_fastfood_equals_the_dense_matrix_column_by_column() -> None:
    rows, d, L = 50, 6, 8
    signs, perm, gauss = fastfood_params(rows, L, rows, torch.Generator().manual_seed(3))
    assert gauss.shape == (7, 8) and sorted(perm[8:16].tolist()) == list(range(8, 16))
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    columns = []
    for c in range(d):
        e = torch.zeros(L)
        e[c] = 1.0
        columns.append(fastfood(e, signs, perm, gauss)[:rows].double())
    P = torch.stack(columns, 1)  # (rows, d)
    expected = dense_fastfood(signs, perm, gauss)[:rows, :d]
    assert torch.allclose(P, expected, atol=1e-5)
    # Each full block has columns of norm exactly sqrt(L / total).
    full = dense_fastfood(signs, perm, gauss)[:L, :d]
    norm = torch.full((d,), (L / rows) ** 0.5, dtype=torch.float64)
    assert torch.allclose(full.norm(dim=0), norm, atol=1e-6)


def test_norms_are_preserved_in_expectation() -> None:
    rows, L = 3000, 64
    x = torch.randn(L, generator=torch.Generator().manual_seed(0))
    ratios = []
    for seed in range(60):
        signs, perm, gauss = fastfood_params(rows, L, rows, torch.Generator().manual_seed(seed))
        y = fastfood(x, signs, perm, gauss)[:rows]
        ratios.append(float(y.square().sum() / x.square().sum()))
    mean = sum(ratios) / len(ratios)
    assert 0.9 < mean < 1.1
    assert max(ratios) < 2.0 and min(ratios) > 0.5


def layers_of(model: nn.Module) -> dict[str, IntrinsicLayer]:
    out = {}
    for path, layer in dt.attachment_of(model).layers("default").items():
        assert isinstance(layer, IntrinsicLayer)
        out[path] = layer
    return out


def test_module_slices_are_the_global_projection_of_theta() -> None:
    model = net()
    att = dt.inject(model, dt.IntrinsicDimension(d=10, structure="did"), targets=["0", "2"])
    shared = att.shared("default")
    assert isinstance(shared, IntrinsicVector)
    assert shared.theta.shape == (10,) and shared.lambdas is None and shared.length == 16
    assert shared.total == 12 * 20 + 20 + 20 * 6 + 6
    with torch.no_grad():
        shared.theta.copy_(torch.randn(10, generator=torch.Generator().manual_seed(1)))
    for layer in layers_of(model).values():
        P = dense_fastfood(layer.signs, layer.perm, layer.gauss)[:, :10]  # this module's rows of P
        flat = (P @ shared.theta.double()).float()
        assert torch.allclose(layer.delta_weight().reshape(-1), flat[: layer.weight_rows], atol=1e-6)
        delta_bias = layer.delta_bias()
        assert delta_bias is not None
        end = layer.weight_rows + layer.bias_rows
        assert torch.allclose(delta_bias, flat[layer.weight_rows : end], atol=1e-6)


def test_said_scales_each_module_by_its_lambda_and_counts_lambdas_in_d() -> None:
    model = net()
    att = dt.inject(model, dt.IntrinsicDimension(d=10), targets=["0", "2"])
    shared = att.shared("default")
    assert isinstance(shared, IntrinsicVector) and shared.lambdas is not None
    assert shared.theta.shape == (8,) and shared.lambdas.shape == (2,)  # d - m and m
    assert torch.equal(shared.lambdas, torch.ones(2))
    assert att.closed_form("default") == (10, 40)
    with torch.no_grad():
        shared.theta.normal_(generator=torch.Generator().manual_seed(2))
    layers = layers_of(model)
    before = {p: layer.delta_weight().clone() for p, layer in layers.items()}
    with torch.no_grad():
        shared.lambdas[1] = -3.0
    assert torch.equal(layers["0"].delta_weight(), before["0"])
    assert torch.allclose(layers["2"].delta_weight(), -3.0 * before["2"], atol=1e-6)


def test_said_needs_more_dimensions_than_modules() -> None:
    with pytest.raises(ValueError, match=r"IntrinsicDimension\.d must be greater than the number of adapted"):
        dt.inject(net(), dt.IntrinsicDimension(d=2), targets=["0", "2"])
    dt.inject(net(), dt.IntrinsicDimension(d=2, structure="did"), targets=["0", "2"])


def test_overriding_a_shared_field_is_refused() -> None:
    with pytest.raises(ValueError, match="'2' overrides d/structure/bias"):
        dt.inject(net(), dt.IntrinsicDimension(d=10), targets=["0", "2"], overrides={"2": {"d": 20}})


def test_bias_false_leaves_the_bias_alone() -> None:
    model = net()
    att = dt.inject(model, dt.IntrinsicDimension(d=10, bias=False), targets=["0", "2"])
    shared = att.shared("default")
    assert isinstance(shared, IntrinsicVector)
    assert shared.total == 12 * 20 + 20 * 6
    assert all(layer.delta_bias() is None for layer in layers_of(model).values())


def projection_after(seed: int) -> dict[str, torch.Tensor]:
    model = net()
    att = dt.inject(model, dt.IntrinsicDimension(d=10), targets=["0", "2"], seed=seed)
    shared = att.shared("default")
    assert isinstance(shared, IntrinsicVector)
    with torch.no_grad():
        shared.theta.copy_(torch.linspace(-1, 1, 8))
    return {p: layer.delta_weight() for p, layer in layers_of(model).items()}


def test_the_seed_picks_the_projection() -> None:
    a, b, c = projection_after(0), projection_after(0), projection_after(1)
    assert all(torch.equal(a[p], b[p]) for p in a)
    assert all(not torch.allclose(a[p], c[p]) for p in a)


def test_gradients_reach_theta_and_lambda_only() -> None:
    model = net()
    att = dt.inject(model, dt.IntrinsicDimension(d=10), targets=["0", "2"])
    shared = att.shared("default")
    assert isinstance(shared, IntrinsicVector) and shared.lambdas is not None
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    model(x).square().sum().backward()
    # At init θ = 0: θ gets a gradient (λ = 1), λ gets exactly zero (P θ = 0).
    assert shared.theta.grad is not None and shared.theta.grad.abs().sum() > 0
    assert shared.lambdas.grad is not None and torch.equal(shared.lambdas.grad, torch.zeros(2))
    with torch.no_grad():
        shared.theta.add_(0.5)
    shared.theta.grad = shared.lambdas.grad = None
    model(x).square().sum().backward()
    assert shared.lambdas.grad is not None and bool((shared.lambdas.grad != 0).all())
    trainable = {id(p) for p in dt.trainable_parameters(model)}
    assert trainable == {id(shared.theta), id(shared.lambdas)}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    assert all(not b.requires_grad for layer in layers_of(model).values() for b in layer.buffers())


def test_two_backward_passes_before_a_step_accumulate() -> None:
    model = net()
    att = dt.inject(model, dt.IntrinsicDimension(d=10), targets=["0", "2"])
    shared = att.shared("default")
    assert isinstance(shared, IntrinsicVector)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()
    once = shared.theta.grad.clone()  # type: ignore[union-attr]
    model(x).sum().backward()
    assert torch.allclose(shared.theta.grad, 2 * once)  # type: ignore[arg-type]


def test_eval_cache_follows_theta() -> None:
    model = net()
    att = dt.inject(model, dt.IntrinsicDimension(d=10), targets=["0", "2"])
    shared = att.shared("default")
    assert isinstance(shared, IntrinsicVector)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)
        shared.theta.add_(0.3)
        moved = model(x)
    assert not torch.allclose(moved, first)
    assert torch.equal(model(x).detach(), moved)


def test_saved_file_holds_d_values_and_the_seed(tmp_path: Path) -> None:
    model = net()
    dt.inject(model, dt.IntrinsicDimension(d=10), targets=["0", "2"], seed=5)
    shared = dt.attachment_of(model).shared("default")
    assert isinstance(shared, IntrinsicVector)
    with torch.no_grad():
        shared.theta.normal_(generator=torch.Generator().manual_seed(0))
        shared.lambdas.add_(0.25)  # type: ignore[union-attr]
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    dt.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert sorted(tensors) == [f"{SHARED_ATTR}.lambdas", f"{SHARED_ATTR}.theta"]
    assert sum(t.numel() for t in tensors.values()) == 10
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["seed"] == 5
    assert config["config"] == {"d": 10, "structure": "said", "bias": True, "lambda_lr_ratio": 1.0}
    fresh = net()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(x), expected)


def test_train_cli_takes_d() -> None:
    from deltatune.cli.main import _train_parser

    argv = ["--method", "intrinsic", "--d", "1000", "--structure", "did"]
    args = _train_parser("intrinsic").parse_args(argv)
    assert args.field__d == 1000 and args.field__structure == "did"


def test_lambdas_get_their_own_learning_rate() -> None:
    model = net()
    att = dt.inject(model, dt.IntrinsicDimension(d=10, lambda_lr_ratio=0.25), targets=["0", "2"])
    shared = att.shared("default")
    assert isinstance(shared, IntrinsicVector)
    groups = att.info("default").method.parameter_groups(att, "default")
    assert groups == {"theta": ([shared.theta], 1.0), "lambdas": ([shared.lambdas], 0.25)}
    did = dt.inject(net(), dt.IntrinsicDimension(d=10, structure="did"), targets=["0", "2"])
    assert list(did.info("default").method.parameter_groups(did, "default")) == ["theta"]
    with pytest.raises(ValueError, match=r"IntrinsicDimension\.lambda_lr_ratio must be 1\.0 with structure"):
        dt.IntrinsicDimension(structure="did", lambda_lr_ratio=0.5)
