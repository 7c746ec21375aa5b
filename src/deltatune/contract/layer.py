"""What a method's ``wrap`` returns: the small module holding the adapter's tensors for one module.

Every layer subclasses one of two kinds:

* :class:`AdditiveLayer`: ``delta(x)`` is added to the base module's output; ``x`` is the module's
  input, or its output when the layer declares ``reads = "output"`` (an adapter placed after a
  projection). Several additive layers can run on one module, and per example (``route``).
  :class:`LowRankLayer` is the additive layer whose update is ``scale · B A x``: it gives its factors
  and inherits ``delta``, ``delta_weight`` and ``lowrank_factors`` (the fused kernel's input).
* :class:`ReplacingLayer`: ``forward(base, *args, **kwargs)`` computes the module's output itself,
  calling ``base`` as it needs (DoRA, prompt and prefix tuning on a body).

The operations every layer has, with their defaults (:class:`Layer`): ``delta_weight()`` (the update
to ``base.weight``, for ``merge``; None: none) or ``merged(base)`` (a plain module to put back
instead; None: use ``delta_weight``), ``lowrank_factors()`` (None: not a low-rank update now),
``export_state()`` / ``import_state(state)`` (the saved tensors, when they differ from the layer's
``state_dict``: a collapsed reparameterisation, VB-LoRA's top-k form).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.experts import ExpertUpdate, expert_delta, experts_forward
from ..kernels.lowrank import lowrank_delta

#: The key under which an adapter's shared state (:meth:`Method.make_shared`) is saved.
SHARED_ATTR = "deltatune_shared"


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()``'s keys and tensors (parameters and persistent buffers, detached), read
    from the modules themselves: no state-dict hooks run, so the whole parameters of a sharded model
    gathered for saving (FSDP2, :mod:`deltatune.train.sharding`) are read as they are, not resharded."""
    out: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in sub._parameters.items():
            if param is not None:
                out[dot + name] = param.detach()
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                out[dot + name] = buffer.detach()
    return out


def shallow_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` with its own tables of parameters, buffers and submodules, sharing their
    tensors: what a merge replaces a weight of, leaving ``base`` itself untouched."""
    new = copy.copy(base)
    new._parameters = dict(base._parameters)
    new._buffers = dict(base._buffers)
    new._modules = dict(base._modules)
    return new


def merged_linear(base: nn.Module, delta: torch.Tensor) -> nn.Module:
    """A plain copy of ``base`` whose weight is ``base.weight + delta`` (added in float32)."""
    weight = base.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"cannot merge into {type(base).__name__}: it has no weight tensor")
    if delta.shape != weight.shape:
        raise ValueError(f"delta_weight has shape {tuple(delta.shape)}, weight has {tuple(weight.shape)}")
    new = shallow_copy(base)
    merged = (weight.detach().float() + delta.detach().float().to(weight.device)).to(weight.dtype)
    new.weight = nn.Parameter(merged, requires_grad=False)
    return new


class Layer(nn.Module):
    """The operations of every adapter layer, with their defaults."""

    additive: ClassVar[bool]

    def delta_weight(self) -> torch.Tensor | None:
        """The update to the base module's weight, in its layout (None: the layer has none)."""
        return None

    def merged(self, base: nn.Module) -> nn.Module | None:
        """A plain module to put back instead of ``base`` on ``merge`` (None: merge ``delta_weight``)."""
        return None

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, scale)`` when the update is ``scale · B A x`` right now, else None."""
        return None

    def lora_form(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The whole update as one plain LoRA on the unmodified base weight, exactly: ``(A, B, scale)``
        with ``delta_weight() == in_weight_layout(scale · B A)``, ``A`` (r, in) and ``B`` (out, r) in
        PEFT's orientation (an embedding's ``in`` is its number of rows), for every module kind and
        whether or not dropout acts. None when the update is not low-rank (a magnitude vector, an
        input-dependent mixture, a dense fold) or no weight update at all. The exports to PEFT's
        plain LoRA, vLLM and llama.cpp read it (:mod:`deltatune.formats.lora`)."""
        return None

    def export_state(self) -> dict[str, torch.Tensor]:
        """The tensors the adapter file stores for this layer (default: its ``state_dict``)."""
        return module_tensors(self)

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of :meth:`export_state` (default: a strict ``load_state_dict``)."""
        self.load_state_dict(state, strict=True)


class AdditiveLayer(Layer):
    """A layer whose ``delta`` is added to the base module's output."""

    additive: ClassVar[bool] = True
    #: "input": ``delta`` reads the module's input; "output": its output (a class or instance value).
    reads: str = "input"

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define delta()")


class ReplacingLayer(Layer):
    """A layer that computes the module's output itself, calling ``base`` as it needs."""

    additive: ClassVar[bool] = False

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define forward(base, *args, **kwargs)")


def dropout_module(p: float) -> nn.Module:
    """Dropout with probability ``p`` on the adapter's input (an identity for ``p == 0``)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def in_weight_layout(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """An ``(out, in)`` update in the layout of the base module's weight: as it is for Linear,
    transposed for GPT-2's Conv1D (``(in, out)``)."""
    return delta if kind == "linear" else delta.t()


class LowRankLayer(AdditiveLayer):
    """An additive layer whose update is ``scale · B A dropout(x)``: it gives ``factors()``, the rest
    follows. ``kind`` is the adapted module's (``"linear"``, ``"conv1d"``, ``"embedding"``)."""

    kind: str
    scale: float
    dropout: nn.Module

    def __init__(self, kind: str, scale: float, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.scale = scale
        self.dropout = dropout_module(dropout)
        self.embedding_kwargs: dict[str, Any] = {}  # F.embedding's options, on an embedding

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``, ``(r, in)`` and ``(out, r)``, such that the update is ``scale · B A``."""
        raise NotImplementedError(f"{type(self).__name__} must define factors()")

    @property
    def dropout_active(self) -> bool:
        """Whether the input dropout acts now (training with p > 0): then the fused kernel, which
        reads the undropped input, cannot serve the layer."""
        return self.training and not isinstance(self.dropout, nn.Identity)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale · B A x`` for the adapter's input ``x`` (token ids for an embedding)."""
        A, B = self.factors()
        if self.kind == "embedding":
            h = F.embedding(x, A.t(), **self.embedding_kwargs)  # (..., r)
            return F.linear(h * self.scale, B)  # (..., out)
        return lowrank_delta(x, A, B, self.scale, self.dropout)  # (the precision policy: lowrank.py)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, scale)`` for the fused kernel of :mod:`deltatune.kernels.lowrank`; None on a module that
        is not a Linear and while dropout is active."""
        if self.kind != "linear" or self.dropout_active:
            return None
        A, B = self.factors()
        return A, B, self.scale

    def lora_form(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``factors()`` and ``scale``: a low-rank layer is a plain LoRA by construction."""
        A, B = self.factors()
        return A.detach(), B.detach(), self.scale

    def delta_weight(self) -> torch.Tensor:
        """``scale · B A`` in the layout of the base weight."""
        A, B = self.factors()
        return in_weight_layout((B @ A) * self.scale, self.kind)


class ExpertsLayer(ReplacingLayer):
    """A layer on a fused-experts module (:func:`deltatune.targets.expert_weights`): low-rank
    updates of some of its 3-D weights, one per expert, that :mod:`deltatune.kernels.experts` applies
    without forming any expert's dense update. It gives ``expert_factors()``; the forward, ``merged``
    and the stacking of several adapters (the wrapper sums their updates, and routes them per
    example) follow."""

    def expert_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, nn.Module]]:
        """weight name -> ``(A, B, scale, dropout)``, ``A`` ``(experts, r, in)``, ``B`` ``(experts,
        out, r)``: the update of expert ``e``'s weight is ``scale · B[e] A[e]``."""
        raise NotImplementedError(f"{type(self).__name__} must define expert_factors()")

    def updates(self, rows: torch.Tensor | None = None) -> dict[str, list[ExpertUpdate]]:
        """The updates the kernel adds, on the tokens whose ``rows`` mask is 1 (None: every token)."""
        return {n: [ExpertUpdate(A, B, s, d, rows)] for n, (A, B, s, d) in self.expert_factors().items()}

    def forward(self, base: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return experts_forward(base, *expert_inputs(args, kwargs), self.updates())

    def merged(self, base: nn.Module) -> nn.Module:
        """A plain copy of the experts module with ``W[e] + scale · B[e] A[e]`` in each adapted weight."""
        new = shallow_copy(base)
        for name, (A, B, scale, _) in self.expert_factors().items():
            weight = base._parameters[name]
            assert weight is not None
            delta = expert_delta(A.detach().float(), B.detach().float(), scale, bool(base.is_transposed))
            merged = (weight.detach().float() + delta.to(weight.device)).to(weight.dtype)
            new._parameters[name] = nn.Parameter(merged, requires_grad=False)
        return new


def expert_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index, top_k_weights)`` of an experts module's call."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
    if len(values) != 3 or len(args) + len(kwargs) != 3:
        raise TypeError(
            f"a fused-experts module is called with {', '.join(names)}; got {len(args)} positional "
            f"and keyword arguments {sorted(kwargs)}"
        )
    return values[0], values[1], values[2]


class Wrapped(nn.Module):
    """The base of :class:`deltatune.runtime.wrapper.Adapted`: a module deltatune has wrapped (a method that
    copies whole blocks, as partial tuning does, refuses blocks that hold one). Its ``base`` is the
    module it wraps."""

    base: nn.Module


def as_layer(layer: nn.Module) -> Layer:
    """``layer`` typed as a :class:`Layer`, or a ``TypeError`` naming its class."""
    if not isinstance(layer, Layer):
        raise TypeError(
            f"{type(layer).__name__} is not an adapter layer: a method's wrap() must return a "
            "deltatune.contract.AdditiveLayer or ReplacingLayer"
        )
    return layer


def reads_output(layer: nn.Module) -> bool:
    """Whether an additive layer's ``delta`` reads the base module's output (not its input)."""
    return isinstance(layer, AdditiveLayer) and layer.reads == "output"


def export_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a layer saves (:meth:`Layer.export_state`); for another module (an adapter's
    shared state) its ``state_dict`` tensors."""
    return module.export_state() if isinstance(module, Layer) else module_tensors(module)


def import_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of :func:`export_state`."""
    if isinstance(module, Layer):
        module.import_state(state)
    else:
        module.load_state_dict(state, strict=True)


def lowrank_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A, B, scale)`` when the layer's update is ``scale · B A x`` right now, else None."""
    return layer.lowrank_factors() if isinstance(layer, Layer) else None
