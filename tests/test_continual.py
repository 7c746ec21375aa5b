"""O-LoRA, AM-LoRA and the task-sequence verbs (deltatune.continual): math, training behaviour on
toys, save/load of a whole sequence, and the refusals."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from deltatune.train.loop import step


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def x_of(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def perturb(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def sequence(method: object, tasks: list[str], seed: int = 0) -> nn.Module:
    """A toy net that learnt ``tasks`` one after another (each task's parameters moved)."""
    model = net(seed)
    dt.continual.start(model, method, tasks[0], targets=["0", "2"])
    perturb(model, 10)
    for i, task in enumerate(tasks[1:]):
        dt.continual.add_task(model, task)
        perturb(model, 11 + i)
    return model


def layer(model: nn.Module, path: str = "0") -> nn.Module:
    return dt.attachment_of(model).layers("continual")[path]


# -- O-LoRA ------------------------------------------------------------------------------------


def test_olora_output_is_the_base_plus_every_tasks_lora() -> None:
    model = sequence(dt.OLoRA(rank=2, alpha=4), ["a", "b", "c"])
    x = x_of()
    loras = layer(model).loras
    base = dt.attachment_of(model).wrappers["0"].base
    expected = base(x) + sum(2.0 * x @ loras.lora_A[t].T @ loras.lora_B[t].T for t in "abc")
    assert torch.allclose(model[0](x), expected, atol=1e-6)
    merged = dt.merge(copy.deepcopy(model))
    assert torch.allclose(merged(x), model(x), atol=1e-5)


def test_olora_regularizer_is_the_papers_two_terms() -> None:
    model = sequence(dt.OLoRA(rank=2, orthogonality=0.7, l2=0.05), ["a", "b", "c"])
    expected = torch.zeros(())
    for path in ("0", "2"):
        loras = layer(model, path).loras
        A_t, B_t = loras.lora_A["c"], loras.lora_B["c"]
        for earlier in "ab":
            expected = expected + 0.7 * (loras.lora_A[earlier] @ A_t.T).pow(2).sum()
        expected = expected + 0.05 * (A_t.pow(2).sum() + B_t.pow(2).sum())
    assert torch.allclose(dt.regularization(model), expected)
    # Only the newest task's A receives the gradient of the orthogonality term.
    dt.regularization(model).backward()
    loras = layer(model).loras
    assert loras.lora_A["c"].grad is not None and loras.lora_A["a"].grad is None


def test_olora_orthogonality_keeps_the_new_row_space_away_from_the_old_one() -> None:
    """Training task 2 with λ1 > 0 leaves ‖A_1 A_2ᵀ‖ far smaller than with λ1 = 0, at the same loss."""
    overlaps = {}
    for lam in (0.0, 1.0):
        model = net()
        dt.continual.start(model, dt.OLoRA(rank=2, orthogonality=lam), "first", targets=["0"])
        perturb(model)
        dt.continual.add_task(model, "second")
        with torch.no_grad():  # start the new A overlapping the old one (as a similar task would)
            loras = layer(model).loras
            loras.lora_A["second"].copy_(loras.lora_A["first"] + 0.1 * torch.randn(2, 8))
        x, y = x_of(64), torch.randn(64, 4, generator=torch.Generator().manual_seed(5))
        opt = torch.optim.Adam(dt.trainable_parameters(model), lr=1e-2)
        for _ in range(200):
            loss = (model(x) - y).pow(2).mean() + dt.regularization(model)
            loss.backward()
            opt.step()
            opt.zero_grad()
        overlaps[lam] = float((loras.lora_A["first"] @ loras.lora_A["second"].T).detach().norm())
    assert overlaps[1.0] < 0.1 * overlaps[0.0]


def test_earlier_tasks_stay_frozen_and_the_output_does_not_move_when_a_task_is_added() -> None:
    for method in (dt.OLoRA(rank=2), dt.AMLoRA(rank=2, attention_dim=4, sparsity=0.0)):
        model = sequence(method, ["a", "b"])
        x = x_of()
        before = model(x).detach()
        frozen = {t: layer(model).loras.lora_A[t].detach().clone() for t in "ab"}
        dt.continual.add_task(model, "c")
        assert dt.continual.task_names(model) == ("a", "b", "c")
        # the new task's B is zero (and so is its AM-LoRA gate's contribution): nothing moves (up to
        # the summation order of a GEMM of rank 3r instead of 2r)
        assert torch.allclose(model(x), before, atol=1e-6, rtol=1e-6)
        loras = layer(model).loras
        assert [loras.lora_A[t].requires_grad for t in "abc"] == [False, False, True]
        trainable = {id(p) for p in dt.trainable_parameters(model)}
        assert id(loras.lora_A["c"]) in trainable and id(loras.lora_A["a"]) not in trainable
        opt = torch.optim.AdamW(dt.trainable_parameters(model), lr=1e-2)
        for n in range(1, 4):
            (model(x).pow(2).mean() + dt.regularization(model)).backward()
            opt.step()
            dt.on_step(model, n, opt)
            opt.zero_grad()
        for t in "ab":
            assert torch.equal(loras.lora_A[t], frozen[t])


def test_amlora_at_one_task_equals_lora_under_its_gate() -> None:
    model = sequence(dt.AMLoRA(rank=2, alpha=2, attention_dim=4), ["only"])
    x = x_of()
    mixer = layer(model)
    loras = mixer.loras
    h = x @ loras.lora_A["only"].T @ loras.lora_B["only"].T  # s = alpha / r = 1
    q = x @ mixer.query.T
    k = h @ mixer.key.T
    gate = torch.sigmoid((q * k).sum(-1, keepdim=True) / 2.0 + mixer.gate_bias["only"])
    base = dt.attachment_of(model).wrappers["0"].base
    assert torch.allclose(model[0](x), base(x) + gate * h, atol=1e-6)


def test_amlora_gates_and_their_l1_penalty() -> None:
    model = sequence(dt.AMLoRA(rank=2, attention_dim=4, sparsity=0.5), ["a", "b", "c"])
    x = x_of()
    mixer = layer(model)
    h = mixer.loras.each(x)
    g = mixer.gates(x, h)
    assert g.shape == (16, 3) and bool(((g >= 0) & (g <= 1)).all())
    model.train()
    model(x)
    expected = 0.5 * torch.stack([g.sum(-1).mean(), _gate_l1(model, x, "2")]).mean()
    assert torch.allclose(dt.regularization(model), expected, atol=1e-6)
    assert float(dt.regularization(model)) == 0.0  # read once: no forward since
    with torch.no_grad():  # an inference forward does not feed the penalty
        model(x)
    assert float(dt.regularization(model)) == 0.0
    copy.deepcopy(model)  # a model that ran a training forward can still be copied


def _gate_l1(model: nn.Module, x: torch.Tensor, path: str) -> torch.Tensor:
    """The second layer's gates' mean L1 norm, on the input it sees."""
    hidden = torch.relu(model[0](x))
    mixer = layer(model, path)
    return mixer.gates(hidden, mixer.loras.each(hidden)).sum(-1).mean()


def test_amlora_sparsity_penalty_closes_the_gates_of_a_task_that_does_not_help() -> None:
    """A frozen earlier task whose LoRA only adds noise: with the L1 penalty the mixer closes its gate
    far more than without it. (The new task's gate shrinks too, its B growing to make up for it: a
    gate times a trainable LoRA is free of scale, so the penalty's choice is among frozen tasks.)"""
    means = {}
    for lam in (0.0, 0.1):
        model = net()
        dt.continual.start(model, dt.AMLoRA(rank=2, attention_dim=4, sparsity=lam), "noise", targets=["2"])
        perturb(model, 21)  # a trained-looking, unrelated LoRA
        dt.continual.add_task(model, "fit")
        x = x_of(128)
        with torch.no_grad(), dt.disabled(model):  # the base plus noise the base cannot explain
            y = model(x) + 0.5 * torch.randn(128, 4, generator=torch.Generator().manual_seed(2))
        opt = torch.optim.Adam(dt.trainable_parameters(model), lr=2e-2)
        for _ in range(300):
            loss = (model(x) - y).pow(2).mean()
            (loss + dt.regularization(model)).backward()
            opt.step()
            opt.zero_grad()
        mixer = layer(model, "2")
        hidden = torch.relu(model[0](x))
        with torch.no_grad():
            means[lam] = mixer.gates(hidden, mixer.loras.each(hidden)).mean(0)  # (noise, fit)
    assert means[0.1][0] < 0.5 * means[0.0][0]
    assert means[0.1].sum() < 0.5 * means[0.0].sum()


# -- the verbs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method", [dt.OLoRA(rank=2, l2=0.1), dt.AMLoRA(rank=2, attention_dim=4)], ids=["olora", "amlora"]
)
def test_a_whole_sequence_saves_as_one_folder_and_loads_back(method: object, tmp_path: Path) -> None:
    model = sequence(method, ["sst2", "agnews", "mrpc"])
    x = x_of()
    expected = model(x)
    dt.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    fresh = net()
    dt.continual.load(fresh, tmp_path)
    assert torch.equal(fresh(x), expected)
    assert dt.continual.task_names(fresh) == ("sst2", "agnews", "mrpc")
    assert not any(p.requires_grad for p in fresh.parameters())
    # trainable=True: the newest task trains on, the others stay frozen; the sequence continues
    again = net()
    dt.continual.load(again, tmp_path, trainable=True)
    loras = layer(again).loras
    assert [loras.lora_A[t].requires_grad for t in ("sst2", "agnews", "mrpc")] == [False, False, True]
    dt.continual.add_task(again, "rte")
    assert torch.allclose(again(x), expected, atol=1e-6, rtol=1e-6)


def test_loading_a_sequence_with_a_task_missing_names_the_task(tmp_path: Path) -> None:
    model = sequence(dt.OLoRA(rank=2), ["sst2", "agnews", "mrpc"])
    dt.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if not k.endswith(".agnews")}, str(tmp_path / "adapter.safetensors")
    )
    fresh = net()
    with pytest.raises(ValueError, match=r"no LoRA for \['agnews'\]"):
        dt.continual.load(fresh, tmp_path)
    assert not dt.has_adapters(fresh)
    with pytest.raises(ValueError, match="missing tensors"):  # dt.load refuses it too
        dt.load(fresh, tmp_path)


def test_bad_input_is_refused_naming_the_field_or_the_cause(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"OLoRA.orthogonality must be a finite number >= 0"):
        dt.OLoRA(orthogonality=-0.5)
    with pytest.raises(ValueError, match=r"OLoRA.l2 must be"):
        dt.OLoRA(l2=-1.0)
    with pytest.raises(ValueError, match=r"AMLoRA.sparsity must be"):
        dt.AMLoRA(sparsity=-0.1)
    with pytest.raises(ValueError, match=r"OLoRA.tasks must be a non-empty tuple of distinct identifiers"):
        dt.OLoRA(tasks=("a", "a"))
    model = net()
    with pytest.raises(ValueError, match="LoRA does not learn a sequence of tasks; use a method that does"):
        dt.continual.start(model, dt.LoRA(rank=2), "a", targets=["0"])
    with pytest.raises(ValueError, match="OLoRA.tasks must be"):
        dt.continual.start(model, dt.OLoRA(rank=2), "not a name", targets=["0"])
    assert not dt.has_adapters(model)
    dt.continual.start(model, dt.OLoRA(rank=2), "a", targets=["0"])
    x = x_of()
    before = model(x)
    with pytest.raises(ValueError, match="already has a task 'a'"):
        dt.continual.add_task(model, "a")
    with pytest.raises(ValueError, match="sequence 'continual' is OLoRA; task 'b' cannot use AMLoRA"):
        dt.continual.add_task(model, "b", method=dt.AMLoRA(rank=2))
    with pytest.raises(
        ValueError, match="reconfigure: adapter 'continual' is OLoRA; it cannot become AMLoRA"
    ):
        dt.reconfigure(model, "continual", dt.AMLoRA(rank=2))
    assert dt.continual.task_names(model) == ("a",) and torch.equal(model(x), before)
    dt.inject(model, dt.LoRA(rank=2), targets=["2"], name="plain")
    with pytest.raises(ValueError, match="adapter 'plain': LoRA does not learn a sequence"):
        dt.continual.add_task(model, "b", name="plain")
    # another method's sequence goes under another name, never into this one
    dt.continual.start(model, dt.AMLoRA(rank=2, attention_dim=2), "x", targets=["2"], name="mixed")
    assert dt.continual.task_names(model, "mixed") == ("x",)


def test_a_saved_lora_joins_the_sequence_as_its_next_task(tmp_path: Path) -> None:
    trained = net()
    dt.inject(trained, dt.LoRA(rank=2, alpha=8), targets=["0", "2"])
    perturb(trained)
    x = x_of()
    lora_delta = trained(x) - net()(x)
    dt.save(trained, tmp_path / "lora")

    model = net()
    dt.continual.start(model, dt.OLoRA(rank=2, alpha=2), "first", targets=["0", "2"])
    dt.continual.add_task(model, "second", from_folder=tmp_path / "lora")
    # the first task's B is still zero: the model is the base plus the imported LoRA, rescaled exactly
    assert torch.allclose(model(x) - net()(x), lora_delta, atol=1e-5)

    other_rank = net()
    dt.inject(other_rank, dt.LoRA(rank=4), targets=["0", "2"])
    dt.save(other_rank, tmp_path / "rank4")
    with pytest.raises(ValueError, match="LoRA of rank 4; the sequence's tasks have rank 2"):
        dt.continual.add_task(model, "third", from_folder=tmp_path / "rank4")
    dora = net()
    dt.inject(dora, dt.DoRA(rank=2), targets=["0", "2"])
    dt.save(dora, tmp_path / "dora")
    with pytest.raises(ValueError, match="holds a 'dora' adapter; a sequence of OLoRA takes a plain LoRA"):
        dt.continual.add_task(model, "third", from_folder=tmp_path / "dora")
    elsewhere = net()
    dt.inject(elsewhere, dt.LoRA(rank=2), targets=["0"])
    dt.save(elsewhere, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="the sequence 'continual' adapts"):
        dt.continual.add_task(model, "third", from_folder=tmp_path / "elsewhere")
    other_base = net(seed=5)
    dt.inject(other_base, dt.LoRA(rank=2), targets=["0", "2"])
    dt.save(other_base, tmp_path / "other-base")
    with pytest.raises(ValueError, match="was saved on another base model"):
        dt.continual.add_task(model, "third", from_folder=tmp_path / "other-base")
    assert dt.continual.task_names(model) == ("first", "second")


def test_the_harness_step_adds_the_regularizer() -> None:
    """deltatune.train.loop.step adds O-LoRA's term once per step, after the last forward."""

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = net()

        def forward(self, x: torch.Tensor) -> object:
            return type("Out", (), {"logits": self.body(x)})()

    model = Classifier()
    dt.continual.start(model, dt.OLoRA(rank=2, orthogonality=50.0), "a", targets=["body.0"])
    perturb(model)
    dt.continual.add_task(model, "b")
    assert dt.needs_step_hooks(model)
    loras = dt.attachment_of(model).layers("continual")["body.0"].loras
    with torch.no_grad():
        loras.lora_A["b"].copy_(loras.lora_A["a"])
    opt = torch.optim.SGD(dt.trainable_parameters(model), lr=1e-3)
    batch = {"x": x_of(), "labels": torch.zeros(16, dtype=torch.long)}
    with pytest.raises(ValueError, match="pass number="):
        step(model, [batch], "classification", opt)
    overlap = float((loras.lora_A["a"] @ loras.lora_A["b"].T).norm())
    for n in range(1, 11):
        step(model, [batch], "classification", opt, number=n)
    assert float((loras.lora_A["a"] @ loras.lora_A["b"].T).norm()) < 0.5 * overlap
    assert math.isfinite(overlap)
