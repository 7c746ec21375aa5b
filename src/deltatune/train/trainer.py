"""The adapters' between-step hooks under the transformers ``Trainer``: :class:`StepHooks`.

``deltatune train`` and :func:`deltatune.train.loop.step` call :mod:`deltatune.runtime.stepping` themselves;
a ``Trainer`` does not know about it, so pass this callback::

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[StepHooks(model)])

``model`` is the adapted model (or the part of it that ``deltatune.inject`` was given); the
regularizer is added to the output of the model the Trainer calls.

It runs each active adapter's ``on_step`` after every optimizer step (transformers'
``on_optimizer_step`` event, before the gradients are cleared), multiplies the learning rate by the
adapters' ``lr_factor`` after every scheduler step, and adds their ``regularizer`` to the loss the
model returns while training (through a forward hook on the model, removed when training ends).
For adapters without such hooks it does nothing.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..runtime.stepping import lr_factor, needs_step_hooks, on_step, regularization

__all__ = ["StepHooks"]


class StepHooks(TrainerCallback):  # type: ignore[misc]
    """A ``transformers.TrainerCallback`` running ``model``'s adapter step hooks (see the module)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not needs_step_hooks(self.model) or self._handle is not None:
            return

        def add_regularizer(module: nn.Module, inputs: Any, output: Any) -> Any:
            loss = getattr(output, "loss", None)
            if module.training and loss is not None:
                output.loss = loss + regularization(self.model).to(loss.device)
            return output

        # On the model the Trainer calls (it returns the loss), which may hold the adapted one.
        top = kwargs.get("model") or self.model
        self._handle = top.register_forward_hook(add_regularizer)
        self._scale_lr(kwargs.get("optimizer"), state.global_step)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Called after optimizer.step(), before zero_grad; global_step is incremented after it.
        if needs_step_hooks(self.model):
            on_step(self.model, state.global_step + 1, kwargs.get("optimizer"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # After the scheduler set this step's learning rate from its own schedule.
        self._scale_lr(kwargs.get("optimizer"), state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _scale_lr(self, optimizer: Any, step: int) -> None:
        factor = lr_factor(self.model, step)
        if optimizer is not None and factor != 1.0:
            for group in optimizer.param_groups:
                group["lr"] *= factor
