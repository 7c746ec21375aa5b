"""ReLoRA: restarts fold s·B A into the layer (never into the base), restart A and B, prune the
optimizer state and re-warm the learning rate; the total update grows beyond rank r."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
import deltatune.runtime.stepping as st
from deltatune.contract import hooks
from deltatune.methods.lowrank.relora import ReLoRA, ReLoRALayer, effective_rank, prune_optimizer_state

IN, OUT = 32, 24


def _base(net: nn.Sequential) -> nn.Linear:
    """The adapted Linear under the wrapper (or the merged/unloaded Linear)."""
    module = net[0]
    base = getattr(module, "base", module)
    assert isinstance(base, nn.Linear)
    return base


def _net(
    method: ReLoRA, seed: int = 0, width: tuple[int, int] = (IN, OUT)
) -> tuple[nn.Sequential, ReLoRALayer]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(*width))
    dt.inject(net, method, targets=["0"], seed=seed)
    layer = dt.attachment_of(net).layers("default")["0"]
    assert isinstance(layer, ReLoRALayer)
    return net, layer


def _data(n: int = 64, width: tuple[int, int] = (IN, OUT)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, width[0], generator=g)
    target = torch.randn(width[1], width[0], generator=g)  # a full-rank map to learn
    return x, x @ target.t()


def _train(
    net: nn.Sequential, opt: torch.optim.Optimizer, steps: range, x: torch.Tensor, y: torch.Tensor, lr: float
) -> list[torch.Tensor]:
    """A plain loop with the step hooks; returns s·B A just before each restart's fold."""
    layer = dt.attachment_of(net).layers("default")["0"]
    assert isinstance(layer, ReLoRALayer)
    before_fold: list[torch.Tensor] = []
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr * st.lr_factor(net, step - 1)
        loss = (net(x) - y).square().mean() + st.regularization(net)
        loss.backward()
        opt.step()
        if step % layer.restart_every == 0:
            before_fold.append((layer.lora_B @ layer.lora_A).detach() * layer.scale)
        st.on_step(net, step, opt)
        opt.zero_grad()
    return before_fold


@pytest.mark.parametrize("width", [(IN, OUT), (8, 8)], ids=["low-rank", "dense"])
def test_total_update_is_the_sum_of_the_folds(width: tuple[int, int]) -> None:
    method = ReLoRA(rank=2, alpha=4, restart_every=3, restarts=4, rewarmup_steps=1)
    net, layer = _net(method, width=width)
    assert layer.dense == (width == (8, 8))  # 4·2·16 > 8·8, but 4·2·56 <= 32·24
    W0 = _base(net).weight.detach().clone()
    x, y = _data(width=width)
    opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    folds = _train(net, opt, range(1, 12), x, y, 1e-2)
    assert len(folds) == layer.folds == 3
    current = (layer.lora_B @ layer.lora_A).detach() * layer.scale
    torch.testing.assert_close(layer.delta_weight().detach(), sum(folds) + current, rtol=1e-5, atol=1e-6)
    assert torch.equal(_base(net).weight, W0)  # the base weight is never modified
    if layer.dense:
        assert layer.folded_A.numel() == 0 and layer.folded_W.shape == (width[1], width[0])
        assert layer.lowrank_factors() is None
    else:
        assert layer.folded_A.shape == (3 * 2, width[0]) and layer.folded_W.numel() == 0
        factors = layer.lowrank_factors()
        assert factors is not None and factors[0].shape[0] == 4 * 2  # fused kernel: trained + folds


def test_restart_keeps_the_output_and_draws_a_new_a_deterministically() -> None:
    method = ReLoRA(rank=2, restart_every=2, restarts=3, rewarmup_steps=1)
    x, y = _data()
    runs = []
    for seed in (0, 0, 5):
        net, layer = _net(method, seed=seed)
        opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
        _train(net, opt, range(1, 2), x, y, 1e-2)
        before = net(x).detach()
        A_before = layer.lora_A.detach().clone()
        _train(net, opt, range(2, 3), x, y, 1e-2)  # step 2: a restart
        # Folding s·B A and restarting with B = 0 leaves the function as optimizer step 2 made it.
        assert torch.count_nonzero(layer.lora_B) == 0 and layer.folds == 1
        assert not torch.equal(layer.lora_A, A_before)
        bound = 1 / math.sqrt(IN)
        assert layer.lora_A.abs().max() <= bound  # LoRA's Kaiming-uniform
        runs.append((layer.lora_A.detach().clone(), before))
    assert torch.equal(runs[0][0], runs[1][0])  # same seed: same restart
    assert not torch.equal(runs[0][0], runs[2][0])  # another seed: another restart


def test_fold_does_not_change_the_output() -> None:
    net, _ = _net(ReLoRA(rank=2, restart_every=2, restarts=1, rewarmup_steps=1))
    x, y = _data()
    opt = torch.optim.SGD(dt.trainable_parameters(net), lr=1e-2)
    _train(net, opt, range(1, 2), x, y, 1e-2)
    (net(x) - y).square().mean().backward()
    opt.step()
    before = net(x).detach()
    st.on_step(net, 2, opt)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def test_effective_rank_grows_beyond_r_on_a_regression() -> None:
    rank = 2
    net, layer = _net(ReLoRA(rank=rank, alpha=4, restart_every=10, restarts=5, rewarmup_steps=2))
    lora, lora_layer = _net(ReLoRA(rank=rank, alpha=4, restart_every=10, restarts=5, rewarmup_steps=2))
    x, y = _data()
    opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=3e-2)
    _train(net, opt, range(1, 51), x, y, 3e-2)
    assert layer.folds == 5
    assert effective_rank(layer) > rank
    assert effective_rank(layer) == 5 * rank  # five independent rank-2 folds (B = 0 after the last)
    # Plain LoRA (no on_step: never restarts) stays at rank r.
    opt = torch.optim.AdamW(dt.trainable_parameters(lora), lr=3e-2)
    for _ in range(50):
        (lora(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert effective_rank(lora_layer) == rank
    assert (net(x) - y).square().mean() < (lora(x) - y).square().mean()


def test_optimizer_state_is_pruned_by_magnitude() -> None:
    p = nn.Parameter(torch.zeros(10, 10))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(10, 10)
    opt.step()
    state = opt.state[p]
    exp_avg = state["exp_avg"].clone()
    prune_optimizer_state(opt, [p], 0.05)
    kept = state["exp_avg"] != 0
    assert int(kept.sum()) == 5 and int((state["exp_avg_sq"] != 0).sum()) == 5
    assert torch.equal(state["exp_avg"][kept], exp_avg[kept])
    assert exp_avg.abs()[kept].min() >= exp_avg.abs()[~kept].max()  # the largest are kept
    assert float(state["step"]) == 1.0  # the step count stays
    before = {k: v.clone() for k, v in state.items()}
    prune_optimizer_state(opt, [p], 1.0)  # keep everything
    assert all(torch.equal(before[k], v) for k, v in state.items())


def test_on_step_prunes_adam_state_of_a_and_b() -> None:
    net, layer = _net(ReLoRA(rank=2, restart_every=2, restarts=1, rewarmup_steps=1, optimizer_keep=0.1))
    x, y = _data()
    opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    _train(net, opt, range(1, 3), x, y, 1e-2)
    for p in (layer.lora_A, layer.lora_B):
        assert int((opt.state[p]["exp_avg"] != 0).sum()) <= math.ceil(0.1 * p.numel())


def test_lr_factor_is_the_jagged_re_warm_up() -> None:
    net, _ = _net(ReLoRA(rank=2, restart_every=4, restarts=2, rewarmup_steps=2))
    assert [st.lr_factor(net, s) for s in range(10)] == [1, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1]
    assert st.needs_step_hooks(net)
    net, _ = _net(ReLoRA(rank=2, restart_every=4, restarts=2, rewarmup_steps=0))
    assert {st.lr_factor(net, s) for s in range(10)} == {1.0}


def _restore(fresh: nn.Sequential, net: nn.Sequential, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A checkpoint's resume: step state, adapter parameters, optimizer state."""
    st.load_step_state(fresh, st.step_state(net))
    old, new = dt.trainable_parameters(net), dt.trainable_parameters(fresh)
    with torch.no_grad():
        for a, b in zip(old, new, strict=True):
            b.copy_(a)
    fresh_opt = torch.optim.AdamW(new, lr=1e-2)
    fresh_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (its own tensors)
    return fresh_opt


@pytest.mark.parametrize("width", [(IN, OUT), (8, 8)], ids=["low-rank", "dense"])
def test_checkpoint_mid_training_continues_identically(width: tuple[int, int]) -> None:
    method = ReLoRA(rank=2, restart_every=3, restarts=3, rewarmup_steps=1)
    x, y = _data(width=width)
    net, _ = _net(method, width=width)
    opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    _train(net, opt, range(1, 5), x, y, 1e-2)  # one restart done (step 3)
    fresh, fresh_layer = _net(method, width=width)
    fresh_opt = _restore(fresh, net, opt)
    assert fresh_layer.folds == 1
    _train(net, opt, range(5, 10), x, y, 1e-2)  # restarts at 6 and 9
    _train(fresh, fresh_opt, range(5, 10), x, y, 1e-2)
    assert torch.equal(net(x), fresh(x))


@pytest.mark.parametrize("width", [(IN, OUT), (8, 8)], ids=["low-rank", "dense"])
@pytest.mark.parametrize("steps", [0, 4, 9])
def test_save_load_round_trips_any_number_of_restarts(
    width: tuple[int, int], steps: int, tmp_path: Path
) -> None:
    method = ReLoRA(rank=2, restart_every=3, restarts=3, rewarmup_steps=1)
    x, y = _data(width=width)
    net, layer = _net(method, width=width)
    opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    _train(net, opt, range(1, steps + 1), x, y, 1e-2)
    dt.save(net, tmp_path)
    stored = sum(t.numel() * t.element_size() for t in layer.export_state().values())
    assert stored == dt.attachment_of(net).closed_form("default")[1]  # one size at any step
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(*width))
    dt.load(fresh, tmp_path, trainable=True)
    loaded = dt.attachment_of(fresh).layers("default")["0"]
    assert isinstance(loaded, ReLoRALayer) and loaded.folds == layer.folds == steps // 3
    assert torch.equal(fresh(x), net(x))
    # ... and training continues as the original does (the restart seed comes from the inject seed).
    fresh_opt = torch.optim.AdamW(dt.trainable_parameters(fresh), lr=1e-2)
    fresh_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (its own tensors)
    _train(net, opt, range(steps + 1, 10), x, y, 1e-2)
    _train(fresh, fresh_opt, range(steps + 1, 10), x, y, 1e-2)
    assert torch.equal(fresh(x), net(x))


@pytest.mark.parametrize("width", [(IN, OUT), (8, 8)], ids=["low-rank", "dense"])
def test_merge_and_unload_after_restarts(width: tuple[int, int]) -> None:
    net, _ = _net(ReLoRA(rank=2, restart_every=2, restarts=3, rewarmup_steps=1), width=width)
    base = _base(net)
    W0 = base.weight.detach().clone()
    x, y = _data(width=width)
    _train(net, torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2), range(1, 7), x, y, 1e-2)
    out = net(x).detach()
    merged = dt.merge(copy.deepcopy(net))
    torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-5)
    dt.unload(net)
    assert net[0] is base and torch.equal(base.weight, W0)  # the same object, untouched


def test_for_steps_fits_or_refuses() -> None:
    method = hooks(ReLoRA(restart_every=10, rewarmup_steps=2))
    assert method.for_steps(35, set()) == ReLoRA(restart_every=10, rewarmup_steps=2, restarts=3)
    with pytest.raises(ValueError, match="restart_every"):
        method.for_steps(10, set())
    with pytest.raises(ValueError, match="restarts"):
        hooks(ReLoRA(restart_every=10, rewarmup_steps=2, restarts=1)).for_steps(35, {"restarts"})


def test_a_restart_without_room_is_refused_and_changes_nothing() -> None:
    net, layer = _net(ReLoRA(rank=2, restart_every=2, restarts=1, rewarmup_steps=1))
    x, y = _data()
    opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    _train(net, opt, range(1, 4), x, y, 1e-2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="ReLoRA.restarts"):
        st.on_step(net, 4, opt)
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"restart_every": 0}, "restart_every"),
        ({"optimizer_keep": 0.0}, "optimizer_keep"),
        ({"optimizer_keep": 1.5}, "optimizer_keep"),
        ({"rewarmup_steps": 5, "restart_every": 5}, "rewarmup_steps"),
        ({"restarts": -1}, "restarts"),
    ],
)
def test_bad_fields_name_the_field(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"ReLoRA.{name}"):
        ReLoRA(**fields)


def test_dropout_spares_the_folded_update() -> None:
    net, layer = _net(ReLoRA(rank=2, dropout=0.5, restart_every=2, restarts=1, rewarmup_steps=1))
    x, y = _data()
    net.train()
    _train(net, torch.optim.SGD(dt.trainable_parameters(net), lr=1e-2), range(1, 3), x, y, 1e-2)
    assert layer.folds == 1 and torch.count_nonzero(layer.lora_B) == 0
    # B = 0 after the restart: the adapter's output is the folded update alone, without dropout.
    expected = x @ layer.delta_weight().detach().t()
    torch.testing.assert_close(layer.delta(x), expected, rtol=1e-5, atol=1e-6)
