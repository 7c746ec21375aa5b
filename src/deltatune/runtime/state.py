"""What an adapter is made of: its tensors (:func:`adapter_state`, what :func:`deltatune.save`
stores; :func:`load_adapter_state`, the inverse) and its counts (:func:`parameter_report`).

It needs the attachment and each layer's export/import (the contract), not the verbs: a method file
that saves or loads its own state imports it from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..contract import SHARED_ATTR, export_state, import_state, module_tensors
from .checks import check_state
from .wrapper import Attachment, attachment_of

__all__ = ["ParameterReport", "adapter_state", "load_adapter_state", "parameter_report"]


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors that make up adapter ``name`` (what :func:`deltatune.save` stores)."""
    att = attachment_of(model)
    att.info(name)
    state: dict[str, torch.Tensor] = {}
    for path, layer in att.layers(name).items():
        tensors = export_state(layer)
        for key, value in tensors.items():
            state[f"{path}.{key}"] = value
    shared = att.shared(name)
    if shared is not None:
        for key, value in module_tensors(shared).items():
            state[f"{SHARED_ATTR}.{key}"] = value
    return state


def load_adapter_state(model: nn.Module, name: str, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` (as :func:`adapter_state` writes them) into adapter ``name``: the inverse of
    :func:`adapter_state`. Every missing, extra or mis-shaped tensor is named (``where``: the file
    or folder, for the message); each layer's ``import_state`` takes its part (``load_state_dict``
    where it has none), and the adapter's trainable parameters are listed again afterwards."""
    att = attachment_of(model)
    check_state(adapter_state(model, name), tensors, where)
    by_owner: dict[str, dict[str, torch.Tensor]] = {}
    owners = {**att.layers(name)}
    shared = att.shared(name)
    if shared is not None:
        owners[SHARED_ATTR] = shared
    for key, value in tensors.items():
        owner = max((p for p in owners if key.startswith(p + ".")), key=len)
        by_owner.setdefault(owner, {})[key[len(owner) + 1 :]] = value
    for owner, state in by_owner.items():
        import_state(owners[owner], state)
    _refresh_trainable(att, name)


def _refresh_trainable(att: Attachment, name: str) -> None:
    """A layer's ``import_state`` may swap its parameters (a training-time reparameterisation, such
    as prefix tuning's MLP, collapses to the stored plain tensors): list what the layers hold now."""
    info = att.adapters[name]
    before = {id(p) for p in info.trainable}
    held = [*att.layers(name).values(), *([info.shared] if info.shared is not None else [])]
    current = {id(p): p for m in held for p in m.parameters()}
    if before <= set(current):
        return
    info.trainable = [p for p in current.values() if id(p) in before or p.requires_grad]
    for p in info.trainable:
        p.requires_grad_(name in att.active)


@dataclass(frozen=True)
class ParameterReport:
    """Parameter accounting for one adapter."""

    adapter: str
    trainable: int
    total: int
    stored_parameters: int
    stored_bytes: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"adapter {self.adapter!r}: {self.trainable:,} trainable of {self.total:,} parameters "
            f"({self.trainable_percent:.3f} %); stores {self.stored_parameters:,} values in "
            f"{self.stored_bytes:,} bytes"
        )


def parameter_report(model: nn.Module, adapter: str | None = None) -> ParameterReport:
    """Count an adapter's trainable parameters and the bytes its saved file holds (tensor data)."""
    att = attachment_of(model)
    name = adapter if adapter is not None else (att.active[0] if att.active else next(iter(att.adapters)))
    info = att.info(name)
    trainable = sum(p.numel() for p in info.trainable)
    total = sum(p.numel() for p in model.parameters())
    state = adapter_state(model, name)
    stored = sum(t.numel() for t in state.values())
    stored_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return ParameterReport(name, trainable, total, stored, stored_bytes)
