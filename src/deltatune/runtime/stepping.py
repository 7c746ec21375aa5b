"""Between optimizer steps: the training-process hooks of the active adapters, for any training loop.

Most methods only change the layer; some change the training process too (AdaLoRA prunes its rank
budget, ReLoRA restarts its factors, Delta-LoRA moves the weight it adapts). They declare it with the
hooks of :mod:`deltatune.contract` (``regularizer``, ``on_step``, ``lr_factor``, ``for_steps``), and
a training loop calls them through this module, whatever the method:

    loss = task_loss + dt.regularization(model)      # before backward
    loss.backward()
    optimizer.step()
    dt.on_step(model, step, optimizer)              # step = optimizer steps done, from 1
    optimizer.zero_grad()

with the learning rate of scheduler step ``s`` (from 0) multiplied by ``dt.lr_factor(model, s)``.
``deltatune train`` does all of this; under the transformers ``Trainer``, pass
``deltatune.train.trainer.StepHooks(model)`` as a callback. For a method without such hooks each
call is a no-op, so a loop can call them unconditionally; :func:`needs_step_hooks` says whether a
model's adapters have any (the harness refuses a loop that would skip them).

A method keeps its between-step state (importance averages, masks, counters) in persistent buffers
of its layers or shared module: :func:`step_state` collects them for a checkpoint, and
:func:`load_step_state` puts them back, so that a resumed run continues exactly.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> net = nn.Sequential(nn.Linear(4, 4))
    >>> _ = dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    >>> opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-3)
    >>> loss = net(torch.randn(2, 4)).square().mean() + dt.regularization(net)
    >>> loss.backward(); opt.step(); dt.on_step(net, 1, opt); opt.zero_grad()
    >>> dt.lr_factor(net, 1), dt.needs_step_hooks(net)
    (1.0, False)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..contract import SHARED_ATTR, Method, hooks
from .wrapper import Attachment, attachment_of, has_adapters

__all__ = [
    "load_step_state",
    "lr_factor",
    "needs_step_hooks",
    "on_step",
    "regularization",
    "step_state",
]

#: The hooks that act during training (their defaults, which do nothing, are the contract's).
_STEP_HOOKS = ("regularizer", "on_step", "lr_factor")


def _attachments(model: nn.Module) -> list[Attachment]:
    """The model's attachment; for a model holding adapted parts (``inject`` was given a submodule,
    or a ``DistributedDataParallel`` wrapper), theirs."""
    if has_adapters(model):
        return [attachment_of(model)]
    found: dict[int, Attachment] = {}
    for module in model.modules():
        if has_adapters(module):
            att = attachment_of(module)
            found.setdefault(id(att), att)
    return list(found.values())


def _active(model: nn.Module) -> Iterator[tuple[Attachment, str, Any]]:
    """(attachment, adapter name, method hooks) for every active adapter; none for a plain model."""
    for att in _attachments(model):
        for name in att.active:
            yield att, name, hooks(att.info(name).method)


def _overrides(method: Any, hook: str) -> bool:
    return getattr(type(method), hook) is not getattr(Method, hook)


def needs_step_hooks(model: nn.Module) -> bool:
    """Whether an active adapter of ``model`` acts between steps (a regularizer, on_step or lr_factor)."""
    return any(_overrides(m, hook) for _, _, m in _active(model) for hook in _STEP_HOOKS)


def regularization(model: nn.Module) -> torch.Tensor:
    """The sum of the active adapters' loss terms (a 0-dim zero when they have none): add it to the
    training loss before ``backward``, once per optimizer step, after the forward pass of the step's
    last micro-batch (a term may read that pass, as AM-LoRA's gate sparsity does)."""
    terms: list[torch.Tensor] = [
        t for att, name, m in _active(model) if (t := m.regularizer(att, name)) is not None
    ]
    total = torch.zeros(())
    for t in terms:
        total = total.to(t.device) + t
    return total


def on_step(model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Run the active adapters' ``on_step`` after ``optimizer.step()``, before the gradients are cleared.

    ``step`` is the number of optimizer steps done (from 1). ``model`` may also be a module holding
    the adapted one (a ``DistributedDataParallel`` wrapper, a model whose submodule was injected).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"on_step: step must be the number of optimizer steps done (>= 1), got {step!r}")
    for att, name, m in _active(model):
        m.on_step(att, name, step, optimizer)


def lr_factor(model: nn.Module, step: int) -> float:
    """The product of the active adapters' learning-rate factors at scheduler step ``step`` (from 0)."""
    factor = 1.0
    for _, _, m in _active(model):
        factor *= float(m.lr_factor(step))
    return factor


def _stateful(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(checkpoint key prefix, module) of every layer and shared module of adapters that act between
    steps."""
    for att, name, m in _active(model):
        if not any(_overrides(m, hook) for hook in _STEP_HOOKS):
            continue
        for path, layer in att.adapter_layers(name).items():
            yield f"{name}:{path}.", layer
        shared = att.shared(name)
        if shared is not None:
            yield f"{name}:{SHARED_ATTR}.", shared


def step_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of adapters that act between steps (for a checkpoint; parameters apart)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in _stateful(model):
        params = {n for n, _ in module.named_parameters()}
        for key, value in module.state_dict().items():
            if key not in params:
                out[prefix + key] = value.detach()
    return out


def load_step_state(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put back what :func:`step_state` returned; a missing or unexpected key is a ``ValueError``."""
    expected = step_state(model)
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(
            f"checkpoint: step state differs from the model's: missing {missing}, unexpected {extra}"
        )
    for prefix, module in _stateful(model):
        params = {n for n, _ in module.named_parameters()}
        for key, target in module.state_dict(keep_vars=True).items():
            if key in params:
                continue
            value = tensors[prefix + key]
            if value.shape != target.shape:
                # a buffer whose size is part of the state (a pruned rank): replace it
                _set_buffer(module, key, value.to(target.device, target.dtype))
            else:
                with torch.no_grad():
                    target.copy_(value)


def _set_buffer(module: nn.Module, key: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    owner._buffers[leaf] = value.clone()
