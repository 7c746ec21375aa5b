"""AdaLoRA (methods/lowrank/adalora.py): the SVD-form update, its closed forms, bad input, the step hooks
from a plain loop, the pruned saved form, and PEFT as the oracle (same init -> same loss and
gradients with the regulariser; the same AdamW steps -> the same masks; files both ways)."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
import deltatune.runtime.stepping as st
from deltatune.methods.lowrank.adalora import AdaLoRA, AdaLoRALayer

peft = pytest.importorskip("peft")

TARGETS = ["a", "b", "c"]
STEPS = 12
SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 2, "delta_t": 2, "total_step": STEPS}


class Net(nn.Module):
    """Three adapted Linears of different shapes and an unadapted head; returns a loss like a
    transformers model (PEFT's AdaLoraModel adds its regulariser to ``outputs.loss``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 10)
        self.c = nn.Linear(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.head(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))
        loss = None if y is None else nn.functional.cross_entropy(logits, y)
        return SimpleNamespace(logits=logits, loss=loss)


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def layers(model: nn.Module) -> dict[str, AdaLoRALayer]:
    out = {p: la for p, la in dt.attachment_of(model).layers("default").items()}
    assert all(isinstance(la, AdaLoRALayer) for la in out.values())
    return out  # type: ignore[return-value]


def randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in layers(model).values():
            for p in la.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


# -- the method's own math ------------------------------------------------------------------------


def test_update_closed_form_and_merge() -> None:
    model = Net()
    att = dt.inject(model, AdaLoRA(init_r=3, target_r=2, alpha=6.0), targets=TARGETS)
    x = torch.randn(5, 8)
    assert torch.equal(model(x).logits, Net()(x).logits)  # E = 0 at init
    randomise(model)
    la = layers(model)["b"]
    assert la.lora_A.shape == (3, 12) and la.lora_E.shape == (3, 1) and la.lora_B.shape == (10, 3)
    h = torch.randn(4, 12)
    expected = h @ (la.lora_B @ torch.diag(la.lora_E.view(-1)) @ la.lora_A).T * 6.0 / (3 + 1e-5)
    torch.testing.assert_close(la.delta(h), expected)
    torch.testing.assert_close(h @ la.delta_weight().T, expected)
    count = sum(3 * (i + o + 1) for i, o in [(8, 12), (12, 10), (10, 6)])
    assert att.closed_form("default") == (count, 4 * count)
    assert sum(p.numel() for p in dt.trainable_parameters(model)) == count
    out = model(x).logits
    merged = dt.merge(copy.deepcopy(model))
    torch.testing.assert_close(merged(x).logits, out)
    # the init draws from the per-module generator: same seed, same factors; P, Q ~ N(0, 0.02²)
    again = Net()
    dt.inject(again, AdaLoRA(init_r=3, target_r=2), targets=TARGETS)
    first = Net()
    dt.inject(first, AdaLoRA(init_r=3, target_r=2), targets=TARGETS)
    for p, q in zip(dt.trainable_parameters(first), dt.trainable_parameters(again), strict=True):
        assert torch.equal(p, q)
    assert 0.01 < float(layers(first)["b"].lora_A.detach().std()) < 0.03


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"AdaLoRA\.target_r must be <= init_r"):
        AdaLoRA(init_r=4, target_r=5)
    with pytest.raises(ValueError, match=r"AdaLoRA\.total_step must be > tinit \+ tfinal"):
        AdaLoRA(tinit=5, tfinal=5, total_step=10)
    for field in ("beta1", "beta2"):
        for value in (0.0, 1.0, 1.5):
            with pytest.raises(ValueError, match=rf"AdaLoRA\.{field} must be a number in \(0, 1\)"):
                kwargs: dict[str, Any] = {field: value}
                AdaLoRA(**kwargs)
    with pytest.raises(ValueError, match=r"AdaLoRA\.orth_reg_weight must be"):
        AdaLoRA(orth_reg_weight=-0.1)
    with pytest.raises(ValueError, match=r"AdaLoRA\.kept_rank must be <= init_r"):
        AdaLoRA(init_r=4, target_r=2, kept_rank=5)
    # the schedule must fit the run
    with pytest.raises(
        ValueError, match=r"AdaLoRA\.tinit \+ AdaLoRA\.tfinal \(3 \+ 2\) must be < the run's 5"
    ):
        AdaLoRA(tinit=3, tfinal=2).for_steps(5, given=())
    # the schedule is global: a per-module override of it is refused, naming the field and module
    model = Net()
    with pytest.raises(ValueError, match=r"AdaLoRA: 'b' overrides tinit"):
        dt.inject(model, AdaLoRA(), targets=TARGETS, overrides={"b": {"tinit": 3}})
    assert not dt.has_adapters(model)
    dt.inject(model, AdaLoRA(), targets=TARGETS, overrides={"b": {"init_r": 10, "alpha": 2.0}})
    # on_step without a total_step: what to do
    net = Net()
    dt.inject(net, AdaLoRA(init_r=2, target_r=1), targets=["a"])
    with pytest.raises(ValueError, match=r"AdaLoRA\.total_step is None"):
        st.on_step(net, 1)
    with pytest.raises(ValueError, match=r"'0' is Embedding"):
        dt.inject(nn.Sequential(nn.Embedding(4, 4)), AdaLoRA(), targets=["0"])


def test_for_steps_fills_total_step_unless_given() -> None:
    method = AdaLoRA(tinit=2, tfinal=3)
    assert method.for_steps(100, given=()).total_step == 100
    given = AdaLoRA(tinit=2, tfinal=3, total_step=50)
    assert given.for_steps(100, given={"total_step"}) is given
    assert given.for_steps(100, given=()).total_step == 100


def test_on_step_leaves_a_frozen_adapter_alone() -> None:
    model = Net()
    dt.inject(model, AdaLoRA(init_r=3, target_r=1, total_step=10), targets=TARGETS)
    randomise(model)
    for p in dt.trainable_parameters(model):
        p.requires_grad_(False)
    x, _ = batch(0)
    before = model(x).logits
    st.on_step(model, 5)  # (it would mask: step 5 of 10, delta_t 1)
    assert torch.equal(model(x).logits, before)


def test_budget_schedule_is_cubic() -> None:
    method = AdaLoRA(tinit=2, tfinal=2, delta_t=2, total_step=12)
    budgets = [method.budget(t, 12, 6) for t in range(12)]
    assert budgets[:3] == [(12, False)] * 3  # warm-up: t <= tinit
    # t in (tinit, T - tfinal): 6 + 6 (1 - (t - 2) / 8)³, floored; masks on multiples of delta_t
    for t in range(3, 10):
        assert budgets[t] == (int(6 * (1 - (t - 2) / 8) ** 3 + 6), t % 2 == 0)
    assert budgets[10] == (6, True) and budgets[11] == (6, True)


# -- PEFT as the oracle ---------------------------------------------------------------------------


def peft_model(**schedule: object) -> Any:
    config = peft.AdaLoraConfig(target_modules=TARGETS, lora_alpha=6, **schedule)
    return peft.get_peft_model(Net(), config)


def same_factors(theirs: Any, **schedule: object) -> nn.Module:
    """Our model with PEFT's initial A, E, B (and E perturbed when asked)."""
    ours = Net()
    method = AdaLoRA(alpha=6.0, **schedule)  # type: ignore[arg-type]
    dt.inject(ours, method, targets=TARGETS)
    with torch.no_grad():
        for path, la in layers(ours).items():
            module = theirs.base_model.model.get_submodule(path)
            for key in ("lora_A", "lora_E", "lora_B"):
                getattr(la, key).copy_(getattr(module, key)["default"])
    return ours


def test_same_factors_as_peft_give_the_same_loss_and_gradients() -> None:
    theirs = peft_model(**_peft_schedule())
    with torch.no_grad():  # leave the zero init so that every gradient is non-trivial
        g = torch.Generator().manual_seed(5)
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    ours = same_factors(theirs, **SCHEDULE)
    x, y = batch(0)
    theirs_loss = theirs.base_model(x, y).loss  # AdaLoraModel.forward adds the regulariser
    ours_loss = ours(x, y).loss + st.regularization(ours)
    assert st.regularization(ours).requires_grad
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=0, atol=0)
    theirs_loss.backward()
    ours_loss.backward()
    for path, la in layers(ours).items():
        module = theirs.base_model.model.get_submodule(path)
        for key in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(la, key).grad, getattr(module, key)["default"].grad)


def _peft_schedule() -> dict[str, object]:
    out: dict[str, object] = {k: v for k, v in SCHEDULE.items() if k != "delta_t"}
    out["deltaT"] = SCHEDULE["delta_t"]
    return out


def e_masks(model: Any, peft_side: bool) -> dict[str, list[bool]]:
    """Which singular values are zero, per module."""
    if peft_side:
        return {
            p: (model.base_model.model.get_submodule(p).lora_E["default"].view(-1) == 0).tolist()
            for p in TARGETS
        }
    return {p: (la.lora_E.view(-1) == 0).tolist() for p, la in layers(model).items()}


def train_both(steps: int = STEPS) -> tuple[Any, nn.Module, list[dict[str, list[bool]]]]:
    """PEFT's loop (update_and_allocate(global_step), global_step from 0) next to a plain loop with
    deltatune.runtime.stepping (on_step(step), step from 1), on the same data; the masks after every step."""
    theirs = peft_model(**_peft_schedule())
    ours = same_factors(theirs, **SCHEDULE)
    assert st.needs_step_hooks(ours)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    opt_ours = torch.optim.AdamW(dt.trainable_parameters(ours), lr=0.05)
    history = []
    for i in range(steps):
        x, y = batch(i)
        theirs.base_model(x, y).loss.backward()
        opt_theirs.step()
        theirs.base_model.update_and_allocate(i)
        opt_theirs.zero_grad()

        (ours(x, y).loss + st.regularization(ours)).backward()
        opt_ours.step()
        st.on_step(ours, i + 1, opt_ours)
        opt_ours.zero_grad()
        history.append(e_masks(ours, False))
        assert history[-1] == e_masks(theirs, True), f"step {i + 1}"
    return theirs, ours, history


def test_same_steps_as_peft_give_the_same_masks_and_outputs() -> None:
    theirs, ours, history = train_both()
    # pruning happened, and at the end the budget is n · target_r
    assert any(any(m) for m in history[4].values())
    kept = {p: int(la.rank_mask.sum()) for p, la in layers(ours).items()}
    assert sum(kept.values()) == 2 * len(TARGETS)
    assert int(dt.attachment_of(ours).shared("default").get_buffer("budget")) == 2 * len(TARGETS)  # type: ignore[union-attr]
    pattern = theirs.peft_config["default"].rank_pattern
    assert {k.split(".")[0]: sum(v) for k, v in pattern.items()} == kept
    for path, la in layers(ours).items():
        assert la.rank_mask.tolist() == pattern[f"{path}.lora_E.default"]
    x, _ = batch(99)
    torch.testing.assert_close(ours(x).logits, theirs(x).logits)
    # the EMAs were reset at the final allocation and stay so in the final phase
    assert all(not la.get_buffer("lora_A_sensitivity").any() for la in layers(ours).values())


def test_pruned_adapter_saves_only_the_kept_triplets_and_loads(tmp_path: Path) -> None:
    _, ours, _ = train_both()
    x, _ = batch(99)
    expected = ours(x).logits
    kept = {p: int(la.rank_mask.sum()) for p, la in layers(ours).items()}
    dt.save(ours, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    for path, k in kept.items():
        assert tensors[f"{path}.lora_A"].shape[0] == k
        assert tensors[f"{path}.lora_E"].shape == (k, 1)
        assert tensors[f"{path}.lora_B"].shape[1] == k
    # the closed form of the saved (pruned) form is the file's size
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert dt.attachment_of(ours).closed_form("default")[1] == stored
    fresh = Net()
    att = dt.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, expected)
    assert att.closed_form("default") == (stored // 4, stored)
    assert sum(p.numel() for p in att.info("default").trainable) == stored // 4
    assert {p: la.rank for p, la in layers(fresh).items()} == kept
    scale = {la.ranknum.item() for la in layers(fresh).values()}
    assert scale == {4.0}  # the scale stays alpha / init_r after pruning, as PEFT's ranknum


def test_step_state_checkpoints_the_importance_and_masks() -> None:
    """Resuming from step_state (plus the factors and optimizer state) continues exactly."""
    _, whole, _ = train_both()
    theirs = peft_model(**_peft_schedule())
    first = same_factors(theirs, **SCHEDULE)
    opt = torch.optim.AdamW(dt.trainable_parameters(first), lr=0.05)

    def run(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
        for i in steps:
            x, y = batch(i)
            (model(x, y).loss + st.regularization(model)).backward()
            optimizer.step()
            st.on_step(model, i + 1, optimizer)
            optimizer.zero_grad()

    run(first, opt, range(7))
    state = st.step_state(first)
    assert any(k.endswith("rank_mask") for k in state) and any("sensitivity" in k for k in state)
    factors = {
        f"{p}.{k}": v.detach().clone() for p, la in layers(first).items() for k, v in la.named_parameters()
    }
    second = same_factors(theirs, **SCHEDULE)
    with torch.no_grad():
        for path, la in layers(second).items():
            for key in ("lora_A", "lora_E", "lora_B"):
                getattr(la, key).copy_(factors[f"{path}.{key}"])
    st.load_step_state(second, state)
    opt2 = torch.optim.AdamW(dt.trainable_parameters(second), lr=0.05)
    opt2.load_state_dict(opt.state_dict())
    run(second, opt2, range(7, STEPS))
    assert all(la.config.kept_rank is not None for la in layers(second).values())  # recorded again
    assert e_masks(second, False) == e_masks(whole, False)
    x, _ = batch(99)
    torch.testing.assert_close(second(x).logits, whole(x).logits)


def test_peft_files_both_ways(tmp_path: Path) -> None:
    theirs, ours, _ = train_both()
    x, _ = batch(99)
    expected = theirs(x).logits
    # PEFT's pruned save -> import_peft
    theirs.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]
    fresh = Net()
    att = dt.import_peft(fresh, tmp_path / "peft")
    torch.testing.assert_close(fresh(x).logits, expected)
    method = att.info("default").method
    assert isinstance(method, AdaLoRA)
    assert (method.init_r, method.target_r, method.delta_t, method.total_step) == (4, 2, 2, STEPS)
    # export_peft -> PeftModel.from_pretrained
    dt.export_peft(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA"
    # (PEFT >= 0.21 warns so about its own pruned files too: LoraConfig reads rank_pattern as LoRA's
    # ranks; earlier releases load them silently)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "rank_pattern keys did not match", RuntimeWarning)
        loaded = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    torch.testing.assert_close(loaded(x).logits, ours(x).logits)
    for path, la in layers(ours).items():
        assert loaded.base_model.model.get_submodule(path).lora_A["default"].shape[0] == la.rank_mask.sum()
    # unpruned, both ways
    untrained = peft_model(**_peft_schedule())
    with torch.no_grad():
        for n, p in untrained.named_parameters():
            if "lora_E" in n:
                p.normal_()
    untrained.save_pretrained(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["rank_pattern"] is None
    plain = Net()
    dt.import_peft(plain, tmp_path / "full")
    torch.testing.assert_close(plain(x).logits, untrained(x).logits)
    dt.export_peft(plain, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(Net(), tmp_path / "back")
    torch.testing.assert_close(back(x).logits, untrained(x).logits)


def test_conv1d_matches_peft() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = nn.Sequential(transformers.pytorch_utils.Conv1D(6, 4))  # 4 -> 6
    config = peft.AdaLoraConfig(target_modules=["0"], init_r=3, target_r=2, total_step=5, fan_in_fan_out=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_E" in n:
                p.normal_()
    ours = copy.deepcopy(base)
    dt.inject(ours, AdaLoRA(init_r=3, target_r=2, total_step=5), targets=["0"])
    layer = layers(ours)["0"]
    module = theirs.base_model.model[0]
    with torch.no_grad():
        for key in ("lora_A", "lora_E", "lora_B"):
            getattr(layer, key).copy_(getattr(module, key)["default"])
    x = torch.randn(3, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(layer.delta_weight(), module.get_delta_weight("default"))


def test_every_peft_config_field_is_in_the_table(tmp_path: Path) -> None:
    from deltatune.formats.peft import TRANSLATORS
    from deltatune.formats.peft.fields import PEFT_BASE_FIELDS, check_peft_config

    table = TRANSLATORS["ADALORA"].fields
    assert table is not None
    fields = {f.name for f in dataclasses.fields(peft.AdaLoraConfig)}
    assert fields - set(table) - set(PEFT_BASE_FIELDS) == set()
    peft.AdaLoraConfig(target_modules=["a"], total_step=10).save_pretrained(tmp_path)
    check_peft_config(json.loads((tmp_path / "adapter_config.json").read_text()), table, "x")
    with pytest.raises(ValueError, match="use_dora"):
        check_peft_config({"peft_type": "ADALORA", "use_dora": True}, table, "x")
