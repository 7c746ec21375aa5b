"""LoRA-drop: the paper's selection rule on known importances, the dropped modules' shared pair, a plain
loop through deltatune.runtime.stepping, a checkpoint across the decision, save/load of a decided adapter and
its stored size, and the refusals. The invariant suite runs it over every toy model by itself
(``tests/test_invariants.py -k lora_drop``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
import deltatune.runtime.stepping as st
from deltatune.contract import hooks
from deltatune.methods.lowrank.lora_drop import DropShared, LoRADrop, LoRADropLayer, kept_by_importance
from deltatune.runtime.wrapper import attachment_of


class Parallel(nn.Module):
    """Four modules of one group (``q``, 8 -> 8) that all read the same input, and an ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(8, 8)}) for _ in range(4)])
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sum(block.get_submodule("q")(x) for block in self.layers)
        assert isinstance(y, torch.Tensor)
        out: torch.Tensor = self.fc(y)
        return out


TARGETS = [f"layers.{i}.q" for i in range(4)] + ["fc"]


def _net() -> Parallel:
    torch.manual_seed(0)
    return Parallel()


def _layers(model: nn.Module) -> dict[str, LoRADropLayer]:
    layers = attachment_of(model).layers("default")
    assert all(isinstance(la, LoRADropLayer) for la in layers.values())
    return {p: la for p, la in layers.items() if isinstance(la, LoRADropLayer)}


def _shared(model: nn.Module) -> DropShared:
    shared = attachment_of(model).shared("default")
    assert isinstance(shared, DropShared)
    return shared


def _x(seed: int = 0, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def _set_known_factors(model: nn.Module, gains: list[float]) -> None:
    """q-module i: B = gains[i] · B0 with one A and B0 for all, so ‖s B A x‖² ∝ gains[i]²; fc: B = 0."""
    g = torch.Generator().manual_seed(3)
    A, B0 = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    layers = _layers(model)
    with torch.no_grad():
        for i, gain in enumerate(gains):
            la = layers[f"layers.{i}.q"]
            assert la.lora_A is not None and la.lora_B is not None
            la.lora_A.copy_(A)
            la.lora_B.copy_(gain * B0)


def test_the_decision_keeps_what_the_papers_rule_picks() -> None:
    model = _net()
    dt.inject(model, LoRADrop(rank=2, alpha=4.0, sample_steps=1, threshold=0.9), targets=TARGETS)
    gains = [1.0, 3.0, 0.5, 2.0]
    _set_known_factors(model, gains)
    x = _x()
    model(x).sum().backward()  # one sampling forward
    layers = _layers(model)
    # The importance is Σ ‖s · B A x‖² over the forward's rows (s = alpha / r = 2).
    for i in range(len(gains)):
        la = layers[f"layers.{i}.q"]
        assert la.lora_A is not None and la.lora_B is not None
        expected = (2.0 * x @ la.lora_A.t() @ la.lora_B.t()).detach().double().square().sum()
        assert float(la.importance) == pytest.approx(float(expected), rel=1e-6)
    assert float(layers["fc"].importance) == 0.0  # B = 0: no output yet
    # Shares ∝ 1, 9, 0.25, 4 (and 0): sorted 9, 4 make 13 / 14.25 = 0.912 >= 0.9; 9 alone is 0.63.
    st.on_step(model, 1)
    dropped = sorted(p for p, la in layers.items() if la.is_dropped)
    assert dropped == ["fc", "layers.0.q", "layers.2.q"]
    importance = {p: float(la.importance) for p, la in layers.items()}
    assert sorted(set(layers) - set(kept_by_importance(importance, 0.9))) == dropped
    assert bool(_shared(model).decided)
    # Once: a later step (or a repeated call) changes nothing.
    before = {p: la.delta_weight().detach().clone() for p, la in layers.items()}
    st.on_step(model, 2)
    assert all(torch.equal(la.delta_weight(), before[p]) for p, la in layers.items())


def test_the_rule_on_its_own() -> None:
    assert kept_by_importance({"a": 1.0, "b": 6.0, "c": 3.0}, 0.9) == ["b", "c"]
    assert kept_by_importance({"a": 1.0, "b": 6.0, "c": 3.0}, 0.6) == ["b"]  # 6/10 reaches 0.6
    assert kept_by_importance({"a": 1.0, "b": 6.0, "c": 3.0, "d": 0.0}, 1.0) == ["b", "c", "a"]
    assert kept_by_importance({"a": 0.0, "b": 0.0}, 0.5) == ["a", "b"]  # nothing known: keep all
    assert kept_by_importance({"a": 2.0, "b": 2.0}, 0.5) == ["a"]  # ties: the given order


def test_dropped_modules_share_one_pair_and_only_it_trains() -> None:
    model = _net()
    dt.inject(model, LoRADrop(rank=2, sample_steps=1, threshold=0.9), targets=TARGETS)
    _set_known_factors(model, [1.0, 3.0, 0.5, 2.0])
    params = dt.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = _x()
    base = _net()(x)
    model(x).square().mean().backward()
    opt.step()
    layers = _layers(model)
    own = {p: (la.lora_A, la.lora_B) for p, la in layers.items()}
    assert all(a in opt.state and b in opt.state for a, b in own.values())
    st.on_step(model, 1, opt)
    opt.zero_grad()
    shared = _shared(model)
    pair = shared.pairs["q_8x8"]  # (group_of: the last path component and (in, out))
    d0, d2 = layers["layers.0.q"], layers["layers.2.q"]
    assert d0.factors()[0] is d2.factors()[0] is pair.lora_A
    assert d0.factors()[1] is d2.factors()[1] is pair.lora_B
    assert layers["layers.1.q"].factors()[0] is layers["layers.1.q"].lora_A  # kept: its own
    # Every factor started afresh: B = 0 everywhere, so the output is the base model's again.
    assert torch.equal(model(x), base)
    # The optimizer forgot every re-initialised or dropped factor, and the pairs.
    assert not any(t in opt.state for a, b in own.values() for t in (a, b))
    assert pair.lora_A not in opt.state
    # The dropped layers' own factors no longer train; the pair does.
    trainable = {id(p) for p in dt.trainable_parameters(model)}
    for la in (d0, d2, layers["fc"]):
        assert la.lora_A is not None and not la.lora_A.requires_grad and id(la.lora_A) not in trainable
    assert id(pair.lora_A) in trainable
    with torch.no_grad():
        pair.lora_B.normal_(generator=torch.Generator().manual_seed(1))  # (so that A gets a gradient)
    model(x).square().mean().backward()
    assert pair.lora_A.grad is not None and pair.lora_A.grad.abs().sum() > 0
    assert pair.lora_B.grad is not None and pair.lora_B.grad.abs().sum() > 0
    assert (
        d0.lora_A is not None and d0.lora_A.grad is None and d0.lora_B is not None and d0.lora_B.grad is None
    )
    # The update in use is the pair's, with the module's own scale; merging agrees.
    expected = d0.scale * pair.lora_B @ pair.lora_A
    assert torch.allclose(d0.delta_weight(), expected)
    out = model(x)
    assert torch.allclose(dt.merge(model)(x), out, atol=1e-5)


def test_a_plain_loop_through_stepping() -> None:
    model = _net()
    method = hooks(LoRADrop(rank=2, threshold=0.5)).for_steps(30, set())
    assert isinstance(method, LoRADrop) and method.sample_steps == 3
    dt.inject(model, method, targets=TARGETS)
    assert st.needs_step_hooks(model)
    opt = torch.optim.AdamW(dt.trainable_parameters(model), lr=1e-2)
    x, y = _x(0, 32), torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    decided = []
    for step in range(1, 9):
        loss = (model(x) - y).square().mean() + st.regularization(model)
        loss.backward()
        opt.step()
        st.on_step(model, step, opt)
        opt.zero_grad()
        decided.append(bool(_shared(model).decided))
    assert decided == [False, False, True, True, True, True, True, True]
    layers = _layers(model)
    dropped = [la for la in layers.values() if la.is_dropped]
    assert dropped and len(dropped) < len(layers)
    # After the decision the kept factors and the pairs of dropped groups train again.
    assert all(la.delta_weight().abs().sum() > 0 for la in layers.values())
    assert st.lr_factor(model, 3) == 1.0 and float(st.regularization(model)) == 0.0
    # Evaluation forwards (no_grad) and forwards after the decision add nothing to the importance.
    importance = {p: float(la.importance) for p, la in layers.items()}
    with torch.no_grad():
        model(x)
    model(x).sum().backward()
    assert {p: float(la.importance) for p, la in layers.items()} == importance


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    x, y = _x(0, 32), torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    for step in steps:
        (model(x) - y).square().mean().backward()
        opt.step()
        st.on_step(model, step, opt)
        opt.zero_grad()


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." in n or "shared" in n}


def _resumed(
    model: nn.Module, opt: torch.optim.Optimizer, method: LoRADrop
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model and optimizer given the checkpoint of ``model``: parameters, optimizer, step state."""
    fresh = _net()
    dt.inject(fresh, method, targets=TARGETS)
    params = dict(fresh.named_parameters())
    with torch.no_grad():
        for n, value in _adapter_tensors(model).items():
            params[n].copy_(value)
    st.load_step_state(fresh, st.step_state(model))
    fresh_opt = torch.optim.AdamW(dt.trainable_parameters(fresh), lr=1e-2)
    # (the optimizer was built from the same parameter list at inject: its state maps one to one)
    fresh_opt.load_state_dict(opt.state_dict())
    return fresh, fresh_opt


def test_step_state_round_trips_across_the_decision() -> None:
    method = LoRADrop(rank=2, sample_steps=3, threshold=0.5)
    reference = _net()
    dt.inject(reference, method, targets=TARGETS)
    ref_opt = torch.optim.AdamW(dt.trainable_parameters(reference), lr=1e-2)
    _train(reference, ref_opt, range(1, 7))

    model: nn.Module = _net()
    dt.inject(model, method, targets=TARGETS)
    opt: torch.optim.Optimizer = torch.optim.AdamW(dt.trainable_parameters(model), lr=1e-2)
    _train(model, opt, range(1, 3))  # mid-sampling: the importances so far travel in the step state
    state = st.step_state(model)
    assert sorted(k.rpartition(".")[2] for k in state) == ["decided"] + ["dropped"] * 5 + ["importance"] * 5
    model, opt = _resumed(model, opt, method)
    _train(model, opt, range(3, 5))  # the decision happens after the resume
    mid = {p: float(la.importance) for p, la in _layers(model).items()}
    model, opt = _resumed(model, opt, method)  # after the decision: the markers travel
    assert {p: float(la.importance) for p, la in _layers(model).items()} == mid
    assert bool(_shared(model).decided)
    _train(model, opt, range(5, 7))
    x = _x(5)
    ref_layers, layers = _layers(reference), _layers(model)
    assert {p: la.is_dropped for p, la in layers.items()} == {
        p: la.is_dropped for p, la in ref_layers.items()
    }
    assert torch.allclose(model(x), reference(x), atol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        st.load_step_state(model, {})


def test_save_and_load_after_the_decision(tmp_path: Path) -> None:
    model = _net()
    dt.inject(model, LoRADrop(rank=2, sample_steps=1, threshold=0.9), targets=TARGETS)
    _set_known_factors(model, [1.0, 3.0, 0.5, 2.0])
    opt = torch.optim.AdamW(dt.trainable_parameters(model), lr=1e-2)
    _train(model, opt, range(1, 4))
    layers = _layers(model)
    dropped = sorted(p for p, la in layers.items() if la.is_dropped)
    assert dropped == ["fc", "layers.0.q", "layers.2.q"]
    x = _x(2)
    expected = model(x)
    dt.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    r = 2
    kept_bytes = 2 * (4 * r * (8 + 8) + 1)  # layers.1.q, layers.3.q: factors and the marker 0
    dropped_bytes = 3 * 1  # the marker 1 only
    shared_bytes = 4 * r * (8 + 8) + 4 * r * (8 + 16) + 1  # groups q_8x8, fc_8x16; the decided flag
    stored = kept_bytes + dropped_bytes + shared_bytes
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == stored
    assert attachment_of(model).closed_form("default") == (
        2 * r * 16 + r * 16 + r * 24,
        stored,
    )
    assert sum(p.numel() for p in dt.trainable_parameters(model)) == 2 * r * 16 + r * 16 + r * 24
    assert int(tensors["layers.0.q.dropped"]) == 1 and "layers.0.q.lora_A" not in tensors
    assert int(tensors["layers.1.q.dropped"]) == 0 and "layers.1.q.lora_A" in tensors

    fresh = _net()
    dt.load(fresh, tmp_path)
    assert torch.equal(fresh(x), expected)
    fresh_layers = _layers(fresh)
    assert sorted(p for p, la in fresh_layers.items() if la.is_dropped) == dropped
    assert fresh_layers["layers.0.q"].lora_A is None  # loaded dropped: no own factors at all
    # Loaded to train on: the decision stands, training goes on with the pruned structure.
    again = _net()
    dt.load(again, tmp_path, trainable=True)
    assert bool(_shared(again).decided)
    opt = torch.optim.AdamW(dt.trainable_parameters(again), lr=1e-2)
    _train(again, opt, range(4, 6))
    assert sorted(p for p, la in _layers(again).items() if la.is_dropped) == dropped
    assert not torch.equal(again(x), expected)


def test_groups_are_by_name_and_shape() -> None:
    class Bert(nn.Module):  # BERT's 'dense' layers: one name, several shapes
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.ModuleDict({"dense": nn.Linear(8, 8)})
            self.intermediate = nn.ModuleDict({"dense": nn.Linear(8, 32)})
            self.output = nn.ModuleDict({"dense": nn.Linear(32, 8)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.attention["dense"](x)
            y: torch.Tensor = self.output["dense"](self.intermediate["dense"](h))
            return y

    model = Bert()
    paths = ["attention.dense", "intermediate.dense", "output.dense"]
    att = dt.inject(model, LoRADrop(rank=2), targets=paths)
    assert sorted(_shared(model).pairs) == ["dense_32x8", "dense_8x32", "dense_8x8"]
    own = 2 * (16 + 40 + 40)
    assert att.closed_form("default") == (2 * own, 4 * 2 * own + 3 + 1)


def test_bad_input_is_refused_naming_the_field() -> None:
    for bad in (0, 0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"LoRADrop\.threshold must be a number in \(0, 1\]"):
            LoRADrop(threshold=bad)
    assert LoRADrop(threshold=1.0).threshold == 1.0
    with pytest.raises(ValueError, match=r"LoRADrop\.sample_steps must be an integer >= 0"):
        LoRADrop(sample_steps=-1)
    with pytest.raises(ValueError, match=r"LoRADrop\.threshold must be .*, got nan"):
        LoRADrop(threshold=math.nan)
    method = hooks(LoRADrop())
    fitted = method.for_steps(100, set())
    assert isinstance(fitted, LoRADrop) and fitted.sample_steps == 10
    assert getattr(method.for_steps(5, set()), "sample_steps", None) == 1
    with pytest.raises(ValueError, match=r"LoRADrop\.sample_steps must be < the run's 1 optimizer steps"):
        method.for_steps(1, set())
    given = hooks(LoRADrop(sample_steps=10))
    with pytest.raises(
        ValueError, match=r"LoRADrop\.sample_steps must be < the run's 10 optimizer steps .*got 10"
    ):
        given.for_steps(10, {"sample_steps"})
    assert given.for_steps(11, {"sample_steps"}) == LoRADrop(sample_steps=10)
    # Training without a sampling phase (never fitted) is refused at the first step, changing nothing.
    model = _net()
    dt.inject(model, LoRADrop(rank=2), targets=TARGETS)
    with pytest.raises(ValueError, match=r"LoRADrop\.sample_steps must be >= 1 when training"):
        st.on_step(model, 1)
    assert not bool(_shared(model).decided)
    # The pairs are shared: a per-module rank is refused, a per-module alpha is fine.
    model = _net()
    with pytest.raises(ValueError, match=r"'fc' overrides rank"):
        dt.inject(model, LoRADrop(rank=2), targets=TARGETS, overrides={"fc": {"rank": 4}})
    assert not dt.has_adapters(model)
    dt.inject(model, LoRADrop(rank=2), targets=TARGETS, overrides={"fc": {"alpha": 4.0}})
    assert _layers(model)["fc"].scale == 2.0
