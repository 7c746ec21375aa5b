"""The training-process hooks (deltatune.runtime.stepping): a method that acts between optimizer steps, called
the same way from a plain loop, the harness's step(), a checkpointed run and the transformers Trainer.

The method is defined and registered here only (like tests/test_writing_a_method.py): a learned
output gain whose ``on_step`` counts steps in a persistent buffer and records the learning rate it
sees, whose ``regularizer`` pulls the gain towards 0, and whose ``lr_factor`` halves odd steps.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.contract import REGISTRY, AdditiveLayer, Method, register
from deltatune.contract.fields import Float, Int, param

LRS: list[float] = []  # the learning rate each on_step saw


@dataclass(frozen=True, kw_only=True)
class StepCounter(Method):
    weight: float = param(0.5, Float(low=0.0), "regularizer weight")
    total: int = param(0, Int(min=0), "steps of the run (0: fitted by for_steps)")

    name: ClassVar[str] = "test_step_counter"
    identity_at_init: ClassVar[bool] = True

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> Gain:
        return Gain(base.out_features)

    def parameter_count(self, base: nn.Module) -> int:
        return int(base.out_features)

    def stored_bytes(self, base: nn.Module) -> int:
        return 4 * int(base.out_features) + 8

    def for_steps(self, total: int, given: Collection[str]) -> StepCounter:
        if "total" in given and self.total > total:
            raise ValueError(f"StepCounter.total {self.total} is longer than the run ({total} steps)")
        return self if "total" in given else replace(self, total=total)

    def regularizer(self, attachment: Any, name: str) -> torch.Tensor:
        gains = [layer.gain for layer in attachment.adapter_layers(name).values()]
        return self.weight * sum(g.square().sum() for g in gains)

    def on_step(self, attachment: Any, name: str, step: int, optimizer: Any) -> None:
        for layer in attachment.adapter_layers(name).values():
            assert layer.gain.grad is not None, "on_step runs before the gradients are cleared"
            layer.steps += 1
            assert int(layer.steps) == step
        LRS.append(optimizer.param_groups[0]["lr"])

    def lr_factor(self, step: int) -> float:
        return 0.5 if step % 2 else 1.0


class Gain(AdditiveLayer):
    reads = "output"

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(width))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def delta(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.gain


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    register(StepCounter)
    LRS.clear()
    try:
        yield
    finally:
        del REGISTRY[StepCounter.name]


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    dt.inject(model, StepCounter(), targets=["0", "2"])
    return model


def steps_of(model: nn.Module) -> list[int]:
    return [int(layer.steps) for layer in dt.attachment_of(model).layers("default").values()]


def test_plain_loop_calls_each_hook() -> None:
    model = net()
    assert dt.needs_step_hooks(model)
    opt = torch.optim.SGD(dt.trainable_parameters(model), lr=0.1)
    x = torch.randn(8, 4)
    for step in range(1, 4):
        task = model(x).square().mean()
        reg = dt.regularization(model)
        (task + reg).backward()
        opt.step()
        dt.on_step(model, step, opt)
        opt.zero_grad()
    assert steps_of(model) == [3, 3]
    gains = [layer.gain for layer in dt.attachment_of(model).layers("default").values()]
    expected = 0.5 * sum(float(g.detach().square().sum()) for g in gains)
    assert float(dt.regularization(model).detach()) == pytest.approx(expected) and expected > 0
    assert [dt.lr_factor(model, s) for s in range(3)] == [1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="on_step: step must be the number of optimizer steps done"):
        dt.on_step(model, 0, opt)


def test_the_regularizer_reaches_the_gradient() -> None:
    model = net()
    layer = dt.attachment_of(model).layers("default")["0"]
    with torch.no_grad():
        layer.gain.fill_(0.3)
    dt.regularization(model).backward()
    torch.testing.assert_close(layer.gain.grad, torch.full((4,), 0.3))  # d/dg 0.5 g^2 = g


def test_a_model_without_step_hooks_costs_nothing() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    assert not dt.needs_step_hooks(model)  # no adapters at all
    dt.inject(model, dt.LoRA(rank=2), targets=["0"])
    assert not dt.needs_step_hooks(model)
    assert float(dt.regularization(model)) == 0.0 and dt.lr_factor(model, 5) == 1.0
    dt.on_step(model, 1)


def test_harness_step_needs_the_step_number_and_runs_the_hooks() -> None:
    import types

    from deltatune.train.loop import step

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net()

        def forward(self, x: torch.Tensor) -> Any:
            return types.SimpleNamespace(logits=self.net(x))

    model = Wrapped()
    opt = torch.optim.SGD(dt.trainable_parameters(model.net), lr=0.1)
    batch = [{"x": torch.randn(4, 4), "labels": torch.zeros(4, dtype=torch.long)}]
    with pytest.raises(ValueError, match="pass number="):
        step(model, batch, "classification", opt)
    for n in (1, 2):
        step(model, batch, "classification", opt, number=n)
    assert steps_of(model.net) == [2, 2]


def test_step_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    from deltatune.runtime.stepping import load_step_state, step_state
    from deltatune.train.checkpoint import load_checkpoint, save_checkpoint
    from deltatune.train.config import TrainConfig

    model = net()
    for layer in dt.attachment_of(model).layers("default").values():
        layer.steps.fill_(7)
    state = step_state(model)
    assert sorted(state) == ["default:0.steps", "default:2.steps"]
    cfg = TrainConfig(method="test_step_counter", out=str(tmp_path))
    params = dt.trainable_parameters(model)
    opt = torch.optim.AdamW(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    names = [str(i) for i in range(len(params))]
    save_checkpoint(tmp_path / "ck", 7, cfg, params, names, opt, sched, {"loss": []}, model=model)
    fresh = net()
    params = dt.trainable_parameters(fresh)
    opt = torch.optim.AdamW(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    load_checkpoint(tmp_path / "ck", cfg, params, names, opt, sched, model=fresh)
    assert steps_of(fresh) == [7, 7]
    with pytest.raises(ValueError, match=r"missing \['default:0.steps', 'default:2.steps'\]"):
        load_step_state(fresh, {})


def test_the_trainer_callback_runs_the_hooks(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from deltatune.train.trainer import StepHooks

    class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(4, generator=g), "labels": torch.tensor(i % 2)}

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> Any:
            logits = self.net(x)
            loss = nn.functional.cross_entropy(logits, labels)
            return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)

    model = Model()
    for layer in dt.attachment_of(model.net).layers("default").values():
        with torch.no_grad():
            layer.gain.fill_(1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Data(), callbacks=[StepHooks(model.net)]
    )
    trainer.train()
    assert steps_of(model.net) == [4, 4]
    # lr_factor(step) for the lr used at optimizer step s (from 1): halved when s - 1 is odd.
    assert pytest.approx([0.1, 0.05, 0.1, 0.05]) == LRS
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses, "the Trainer logged its loss"
    # The logged loss includes the regularizer: 0.5 * sum(g^2) is about 3 at g = 1 (6 gains), far
    # above a 2-class cross-entropy alone.
    assert losses[0] > 2.0
    assert not model._forward_hooks  # the regularizer's hook is gone after training


def test_for_steps_fits_or_refuses() -> None:
    fitted = dt.contract.hooks(StepCounter()).for_steps(100, set())
    assert fitted.total == 100
    with pytest.raises(ValueError, match="StepCounter.total 200 is longer than the run"):
        dt.contract.hooks(StepCounter(total=200)).for_steps(100, {"total"})
    assert dt.contract.hooks(dt.LoRA()).for_steps(5, set()) == dt.LoRA()  # no schedule: itself


def test_a_module_structure_chosen_in_training_is_saved_and_loaded(tmp_path: Path) -> None:
    """Attachment.set_module_fields records a per-module field as an exact-path override (saved and
    re-created by load); freeze retires parameters from training."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    att = dt.inject(model, dt.LoRA(rank=2), targets=["0", "1"])
    att.set_module_fields("default", "1", {"rank": 1})
    assert att.info("default").overrides == {r"^1$": {"rank": 1}}
    att.set_module_fields("default", "1", {"rank": 2})  # back to the adapter's value: no override left
    assert att.info("default").overrides == {}
    with pytest.raises(ValueError, match="set_module_fields: '2' is not a target of adapter 'default'"):
        att.set_module_fields("default", "2", {"rank": 1})
    layer = att.adapter_layers("default")["0"]
    att.freeze("default", [layer.lora_A])
    assert not layer.lora_A.requires_grad
    assert all(p is not layer.lora_A for p in dt.trainable_parameters(model))
