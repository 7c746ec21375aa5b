"""VeRA's own math and storage: one frozen shared pair (sliced per module), trainable d and b,
closed forms, bad input, and PEFT as the oracle (same vectors and projections -> same outputs; files
both ways, with and without ``save_projection``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from conftest import require_peft_of_the_lock
from deltatune.contract import SHARED_ATTR
from deltatune.methods.lowrank.vera import Projections, VeRA, VeRALayer, projections


class Net(nn.Module):
    """Modules of different shapes (so slices differ), a GPT-2 Conv1D, and a head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 6)
        self.c = Conv1D(10, 6)  # (nf=out, nx=in): 6 -> 10
        self.head = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))


TARGETS = ["a", "b", "c"]


def randomise(att: dt.runtime.wrapper.Attachment, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in att.info("default").trainable:
            p.copy_(torch.randn(p.shape, generator=g))


def test_one_frozen_pair_sliced_per_module_and_only_vectors_train(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = Net()
    att = dt.inject(model, VeRA(rank=4), targets=TARGETS)
    pairs = [m for m in model.modules() if isinstance(m, Projections)]
    assert len(pairs) == 1
    shared = pairs[0]
    assert shared.vera_A.shape == (4, 12) and shared.vera_B.shape == (12, 4)  # largest in, largest out
    A, B = projections(4, 12, 12, 0)
    assert torch.equal(shared.vera_A, A) and torch.equal(shared.vera_B, B)
    assert not any(p is shared.vera_A or p is shared.vera_B for p in model.parameters())
    layers = att.layers("default")
    assert all(isinstance(la, VeRALayer) for la in layers.values())
    layer_b = layers["b"]
    assert isinstance(layer_b, VeRALayer)
    a_slice, b_slice = layer_b.projections()
    assert torch.equal(a_slice, A[:, :12]) and torch.equal(b_slice, B[:6, :])
    assert torch.equal(layer_b.lambda_d, torch.full((4,), 0.1)) and not layer_b.lambda_b.any()
    # trainable r + out per module; the file holds only the vectors
    assert att.closed_form("default") == ((4 + 12) + (4 + 6) + (4 + 10), 4 * 40)
    assert sum(p.numel() for p in dt.trainable_parameters(model)) == 40
    dt.save(model, tmp_path)
    stored = load_file(str(tmp_path / "adapter.safetensors"))
    assert sorted(stored) == sorted(f"{p}.lambda_{v}" for p in TARGETS for v in "bd")


def test_update_is_scaled_random_projection() -> None:
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 5))
    att = dt.inject(model, VeRA(rank=3, d_initial=0.5), targets=["0", "2"])
    randomise(att)
    layer = att.layers("default")["2"]
    assert isinstance(layer, VeRALayer)
    A, B = projections(3, 12, 12, 0)
    x = torch.randn(4, 12)
    expected = (layer.lambda_b[:, None] * B[:5]) @ torch.diag(layer.lambda_d) @ A[:, :12] @ x.T
    assert torch.allclose(layer.delta(x), expected.T, atol=1e-6)
    assert torch.allclose(layer.delta_weight() @ x.T, expected, atol=1e-6)
    other = dt.inject(nn.Sequential(nn.Linear(12, 5)), VeRA(rank=3, projection_prng_key=7), targets=["0"])
    assert not torch.equal(other.shared("default").vera_A, A[:, :12])  # type: ignore[union-attr]


def test_bad_input_names_the_field_or_module() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="'0' is Embedding"):
        dt.inject(model, VeRA(rank=2), targets=["0"])
    for field, value in (("rank", 3), ("projection_prng_key", 1), ("save_projection", True)):
        with pytest.raises(ValueError, match=rf"'2' overrides {field}"):
            dt.inject(model, VeRA(rank=2), targets=["1", "2"], overrides={"2": {field: value}})
    assert not dt.has_adapters(model)
    small = Projections(VeRA(rank=2), 4, 4, torch.float32)
    with pytest.raises(ValueError, match=r"'1' needs a slice of \(2, 8\) of the shared A"):
        VeRA(rank=2).wrap(model[1], small, path="1", generator=torch.Generator())
    with pytest.raises(ValueError, match=r"VeRA\.rank must be"):
        VeRA(rank=0)
    # per-module d_initial and dropout are fine (not shared)
    dt.inject(model, VeRA(rank=2), targets=["1", "2"], overrides={"2": {"d_initial": 0.3, "dropout": 0.1}})


def seq() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 5))


def test_saved_projection_is_stored_and_used(tmp_path: Path) -> None:
    model = seq()
    att = dt.inject(model, VeRA(rank=3, save_projection=True), targets=["0", "2"])
    randomise(att)
    assert att.closed_form("default")[1] == 4 * ((3 + 12) + (3 + 5) + 3 * (12 + 12))  # A (3, 12), B (12, 3)
    with torch.no_grad():
        att.shared("default").vera_A.mul_(2.0)  # type: ignore[union-attr]  # no longer the seed's
    x = torch.randn(3, 8)
    expected = model(x)
    dt.save(model, tmp_path)
    assert f"{SHARED_ATTR}.vera_A" in load_file(str(tmp_path / "adapter.safetensors"))
    fresh = seq()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(x), expected)  # the stored pair, not the regenerated one


# -- PEFT as the oracle ---------------------------------------------------------------------------


def peft_vera(save_projection: bool = True, **kw: object) -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.VeraConfig(
        r=4, target_modules=TARGETS, save_projection=save_projection, modules_to_save=["head"], **kw
    )
    with pytest.warns(UserWarning) if not save_projection else contextlib.nullcontext():
        theirs = peft.get_peft_model(Net(), config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "vera_lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g))
        theirs.base_model.model.head.modules_to_save["default"].weight.add_(0.3)
    return theirs


def test_same_vectors_and_projections_as_peft_give_the_same_outputs() -> None:
    theirs = peft_vera()
    ours = Net().eval()
    att = dt.inject(ours, VeRA(rank=4), targets=TARGETS)
    shared = att.shared("default")
    assert isinstance(shared, Projections)
    assert torch.equal(shared.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, theirs.base_model.vera_B["default"])
    state = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, layer in att.layers("default").items():
            assert isinstance(layer, VeRALayer)
            layer.lambda_b.copy_(state[f"base_model.model.{path}.vera_lambda_b.default"])
            layer.lambda_d.copy_(state[f"base_model.model.{path}.vera_lambda_d.default"])
        ours.head.weight.copy_(theirs.base_model.model.head.modules_to_save["default"].weight)
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = theirs(x)
        assert (ours(x) - expected).abs().max() <= 1e-5
        merged = dt.merge(ours)
        assert (merged(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_vera_files_both_ways(save_projection: bool, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    theirs = peft_vera(save_projection)
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = theirs(x)
    theirs.save_pretrained(tmp_path / "peft")
    ours = Net()
    att = dt.import_peft(ours, tmp_path / "peft", trainable=True)
    method = att.info("default").method
    assert isinstance(method, VeRA)
    assert method.rank == 4 and method.save_projection is save_projection
    with torch.no_grad():
        assert (ours(x) - expected).abs().max() <= 1e-5
    ours(x).sum().backward()
    assert all(p.grad is not None for p in dt.trainable_parameters(ours))

    dt.export_peft(ours, tmp_path / "ours")
    exported = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.vera_A" in exported and "base_model.vera_B" in exported
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["save_projection"] is True
    back = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(x) - ours(x)).abs().max() <= 1e-5


def test_peft_file_projections_are_used_as_they_are(tmp_path: Path) -> None:
    """A file whose vera_A / vera_B are not what the key regenerates: the file's are used (as PEFT)."""
    # peft 0.18 (the minimum) loads such a file without an error but drops the saved vera_A/vera_B
    # (set_peft_model_state_dict re-inserts the adapter name only into keys holding "vera_lambda_",
    # so "base_model.vera_A" lands in load_state_dict(strict=False)'s unexpected keys) and keeps the
    # projections regenerated from projection_prng_key; peft 0.21 loads them. Using the file's pair
    # is what save_projection is for, so the comparison runs against the fixed PEFT only.
    require_peft_of_the_lock("peft < 0.21 silently drops saved vera_A/vera_B and regenerates them")
    peft = pytest.importorskip("peft")
    theirs = peft_vera()
    theirs.save_pretrained(tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 1.5
    save_file(tensors, str(file), metadata={"format": "pt"})
    back = peft.PeftModel.from_pretrained(Net(), tmp_path / "peft").eval()
    ours = Net().eval()
    dt.import_peft(ours, tmp_path / "peft")
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert (ours(x) - back(x)).abs().max() <= 1e-5
    # only one half of the pair: refused, naming it; the model is left as it was
    del tensors["base_model.vera_B"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    fresh = Net()
    with pytest.raises(ValueError, match="only vera_A of the shared pair"):
        dt.import_peft(fresh, tmp_path / "peft")
    assert not dt.has_adapters(fresh)


def test_every_peft_vera_config_field_is_in_the_table(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from deltatune.formats.peft import TRANSLATORS
    from deltatune.formats.peft.fields import PEFT_BASE_FIELDS, check_peft_config

    table = TRANSLATORS["VERA"].fields
    assert table is not None
    fields = {f.name for f in dataclasses.fields(peft.VeraConfig)}
    assert fields - set(table) - set(PEFT_BASE_FIELDS) == set(), "fields missing from the table"
    assert set(table) - fields == set(), "table entries PEFT does not have"
    peft.VeraConfig(target_modules=["fc1"]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    check_peft_config(saved, table, "adapter_config.json")
    with pytest.raises(ValueError, match=r"adapter_config\.json: bias='all'"):
        check_peft_config({**saved, "bias": "all"}, table, "adapter_config.json")


def test_tiny_gpt2_same_logits_and_gradients_as_peft() -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    def gpt2() -> nn.Module:
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    targets = ["c_attn", "c_proj", "c_fc"]  # Conv1D of (in, out) 32x96, 32x32 / 128x32, 32x128
    config = peft.VeraConfig(r=8, target_modules=targets, fan_in_fan_out=True)
    with warnings.catch_warnings():  # (PEFT's notes on fan_in_fan_out)
        warnings.simplefilter("ignore", UserWarning)
        theirs = peft.get_peft_model(gpt2(), config)
    ours = gpt2()
    att = dt.inject(ours, VeRA(rank=8), targets=targets)
    g = torch.Generator().manual_seed(2)
    mine = {n: p for n, p in theirs.named_parameters() if "vera_lambda" in n}
    with torch.no_grad():
        for p in mine.values():
            p.copy_(torch.randn(p.shape, generator=g))
        for path, layer in att.layers("default").items():
            assert isinstance(layer, VeRALayer)
            layer.lambda_b.copy_(mine[f"base_model.model.{path}.vera_lambda_b.default"])
            layer.lambda_d.copy_(mine[f"base_model.model.{path}.vera_lambda_d.default"])
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = theirs(input_ids=ids).logits
    got = ours(input_ids=ids).logits
    assert not torch.allclose(expected, gpt2()(input_ids=ids).logits, atol=1e-4)
    assert (got - expected).abs().max() <= 1e-5
    expected.pow(2).mean().backward()
    got.pow(2).mean().backward()
    for path, layer in att.layers("default").items():
        assert (
            isinstance(layer, VeRALayer)
            and layer.lambda_b.grad is not None
            and layer.lambda_d.grad is not None
        )
        for ours_grad, key in ((layer.lambda_b.grad, "b"), (layer.lambda_d.grad, "d")):
            theirs_grad = mine[f"base_model.model.{path}.vera_lambda_{key}.default"].grad
            assert theirs_grad is not None
            assert torch.allclose(ours_grad, theirs_grad, atol=1e-5, rtol=1e-4), (path, key)
