"""LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation (Zhou et al. 2024),
arXiv:2402.07721.

    y = W0 x + s · B_m A_m dropout(x),    s = alpha / r,
    (A_m, B_m) = the module's own LoRA if it is kept, else the one pair its group shares

The paper prunes LoRA by how much each module's update changes its output. Here a run does it in two
phases, driven by the training-process hooks (:mod:`deltatune.runtime.stepping`):

1. *Sampling* (optimizer steps 1 .. ``sample_steps``): every adapted module trains its own LoRA
   (A Kaiming-uniform, B = 0: the base model at init) and accumulates its importance over the
   training forwards, ``I_m = Σ ‖s · B_m A_m x‖²`` (a persistent float64 buffer: a checkpoint holds
   it). While it collects, :meth:`LoRADropLayer.lowrank_factors` is None, so that ``delta`` runs.
2. *Decision* (``on_step`` at step ``sample_steps``, once): with the shares ``I_m / Σ I`` sorted
   in descending order, the smallest prefix whose cumulative share reaches ``threshold`` is kept
   (the paper's rule, T = 0.9); every other module is *dropped* and from then on uses the one
   (A, B) pair of its group, kept in the adapter's shared module (created at inject: A
   Kaiming-uniform, B = 0; trainable, but until then unused: it gets a zero gradient while the
   importance is collected, so that every trainable parameter takes part in backward, and it is
   put back to its initial values, from its own seed, at the decision). The kept
   modules' factors start afresh (A Kaiming-uniform from the layer's own seed, B = 0): the paper
   trains the pruned structure anew on the full data after the sampling run, so the output returns
   to the base model's at the decision. The optimizer state of every re-initialised or dropped
   factor is removed, the dropped layers' own factors stop training (``requires_grad`` False; no
   longer in the adapter's trainable list), and the decision is recorded in the adapter's per-module
   overrides (``{"^path$": {"dropped": True}}``), so that a saved adapter re-creates the pruned
   structure when it is loaded.

A group is the module's last path component with its (in, out) shape (``layers.3.mlp.fc``: group
``fc`` of that shape), so that BERT's several ``dense`` layers of different shapes do not collide.
If every importance is zero (nothing moved during sampling) nothing is known to be unimportant and
every module is kept. Importance is summed over the forwards that train: with gradients enabled and
the factors trainable, in training or eval mode (an evaluation under ``torch.no_grad`` does not count,
nor does the no-grad first pass of reentrant activation checkpointing).

``dropped`` is also a field: ``overrides={"layers.0.fc": {"dropped": True}}`` makes a module use
its group's pair from the start (no own factors at all: that is how a saved, decided adapter loads).

Closed forms, per adapted Linear/Conv1D with (in, out) and b = 4 (the float32 adapter; 8 on a float64
base), and per group g of shape (in_g, out_g):

    trainable = Σ_kept r · (in + out) + Σ_g r · (in_g + out_g)
    stored bytes = Σ_kept (b · r · (in + out) + 1) + Σ_dropped 1 + Σ_g b · r · (in_g + out_g) + 1

(1 byte: each module's uint8 ``dropped`` marker; the last 1: the shared uint8 ``decided`` flag.)
Before the decision every module is kept. PEFT has no LoRA-drop, so there is no PEFT import or
export.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> from deltatune.methods.lowrank.lora_drop import LoRADrop
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    >>> att = dt.inject(net, LoRADrop(rank=2, sample_steps=2, threshold=0.5), targets=["0", "1"])
    >>> att.closed_form("default")  # own 2·(2·16); groups "0", "1": 2·(2·16); 2 markers + the flag
    (128, 515)
    >>> opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    >>> x, y = torch.randn(16, 8), torch.randn(16, 8)
    >>> for step in range(1, 4):
    ...     (net(x) - y).square().mean().backward()
    ...     opt.step(); dt.on_step(net, step, opt); opt.zero_grad()
    >>> sorted(p for p, layer in att.layers("default").items() if layer.is_dropped)
    ['1']
    >>> att.closed_form("default")  # '1' dropped: its own factors no longer train nor are saved
    (96, 387)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..._cache import Memo
from ...contract import AdapterView, LowRankLayer, Suite, layers_of, register
from ...contract.fields import Bool, Float, Int, param
from ...kernels.lowrank import lowrank_delta
from ...targets import shape_of
from .base import KaimingUniform, ScaledLowRank, adapter_dtype, linear_like, restart_factors

__all__ = ["DropPair", "DropShared", "LoRADrop", "LoRADropLayer", "group_of", "kept_by_importance"]


def group_of(path: str, base: nn.Module) -> str:
    """The sharing group of a module: its last path component and its (in, out) shape, as a
    ``ModuleDict`` key (``"fc_8x16"``; ``"root_8x16"`` for the model itself)."""
    in_features, out_features = shape_of(base)
    return f"{path.rpartition('.')[2] or 'root'}_{in_features}x{out_features}"


def kept_by_importance(importance: Mapping[str, float], threshold: float) -> list[str]:
    """The paper's rule: the smallest set of the most important modules whose share of the total
    importance reaches ``threshold`` (ties keep the given order); all of them if the total is 0.

    Example:
        >>> kept_by_importance({"a": 1.0, "b": 6.0, "c": 3.0}, 0.9)
        ['b', 'c']
    """
    order = sorted(importance, key=lambda p: -importance[p])  # (stable: ties in the given order)
    cumulative = 0.0
    sums: list[float] = []
    for path in order:
        cumulative += float(importance[path])
        sums.append(cumulative)
    total = sums[-1] if sums else 0.0  # (the same additions: threshold 1 reaches it exactly)
    if total <= 0.0:
        return list(importance)
    for k, partial in enumerate(sums, start=1):
        if partial >= threshold * total:
            return order[:k]
    return order


class DropPair(nn.Module):
    """The (A, B) that the dropped modules of one group share."""

    def __init__(
        self, rank: int, in_features: int, out_features: int, dtype: torch.dtype, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))  # (out, r)
        KaimingUniform().initialise(self.lora_A.data, self.lora_B.data, kind="linear", generator=generator)
        # The seed of the pair's fresh start at the decision (drawn after A, from the shared generator).
        self.seed = int(torch.randint(0, 2**62, (), generator=generator))

    def restart(self) -> None:
        """The pair as it was made (A Kaiming-uniform from its seed, B = 0), whatever the sampling
        phase's zero gradients and weight decay did to it."""
        restart_factors(self.lora_A, self.lora_B, kind="linear", seed=self.seed)

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}"


class DropShared(nn.Module):
    """An adapter's shared state: one :class:`DropPair` per group and the ``decided`` flag."""

    decided: torch.Tensor

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.pairs = nn.ModuleDict()
        self.register_buffer("decided", torch.zeros((), dtype=torch.uint8))
        self._decided_memo: Memo[bool] = Memo()

    @property
    def is_decided(self) -> bool:
        """Whether the decision has been taken (read once per change of the flag, not per forward)."""
        return _flag(self._decided_memo, self.decided)


def _flag(memo: Memo[bool], t: torch.Tensor) -> bool:
    cached = memo.get(t)
    return memo.put(bool(t), t) if cached is None else cached


@register
@dataclass(frozen=True, kw_only=True)
class LoRADrop(ScaledLowRank):
    """LoRA whose least important modules, judged by their output after a sampling phase, share one
    pair of factors per group (see the module docstring for the procedure).

    Fields (paper defaults in brackets):
        rank: r, the rank of every pair of factors [8, as LoRA].
        alpha: scaling numerator; the update is scaled by alpha/r [8, as LoRA].
        dropout: dropout on the adapter's input [0.0].
        sample_steps: optimizer steps of the sampling phase, at the end of which the modules are
            chosen; 0: fitted by :meth:`for_steps` to ``max(1, total // 10)`` [0; the paper samples
            a fraction of the training data].
        threshold: the share of the total importance that the kept modules make up, in (0, 1]
            [0.9, the paper's T].
        dropped: the module uses its group's shared pair from the start (set per module, through
            ``overrides``; the decision records itself so) [False].
    """

    sample_steps: int = param(
        0,
        Int(min=0),
        "optimizer steps of the sampling phase before the modules are chosen (0: fitted by for_steps "
        "to max(1, total // 10))",
    )
    threshold: float = param(
        0.9, Float(0.0, 1.0, low_open=True), "share of the total importance the kept modules make up"
    )
    dropped: bool = param(False, Bool(), "the module uses its group's shared pair (set per module)")

    name: ClassVar[str] = "lora_drop"
    suite: ClassVar[Suite] = Suite(example={"rank": 2, "sample_steps": 2})

    def default_lr(self) -> float:
        """3e-3, as LoRA's; chosen on SST-2's validation split (MiniLM, query/value, 150 steps:
        benchmarks/README.md, "Each method at its own learning rate"): 83.8 at 3e-3, 81.4 at 1e-2, 81.0
        at 1e-3."""
        return 3e-3

    # -- shared state -----------------------------------------------------------------------------
    def _groups(self, bases: Mapping[str, nn.Module]) -> dict[str, tuple[int, int, torch.dtype]]:
        out: dict[str, tuple[int, int, torch.dtype]] = {}
        for path, base in bases.items():
            out.setdefault(group_of(path, base), (*shape_of(base), adapter_dtype(base)))
        return out

    def make_shared(self, bases: Mapping[str, nn.Module], generator: torch.Generator) -> DropShared:
        shared = DropShared(self.rank)
        for group, (in_features, out_features, dtype) in self._groups(bases).items():
            shared.pairs[group] = DropPair(self.rank, in_features, out_features, dtype, generator)
        return shared

    def shared_parameter_count(self, bases: Mapping[str, nn.Module]) -> int:
        return sum(self.rank * (i + o) for i, o, _ in self._groups(bases).values())

    def shared_stored_bytes(self, bases: Mapping[str, nn.Module]) -> int:
        pairs = sum(self.rank * (i + o) * dtype.itemsize for i, o, dtype in self._groups(bases).values())
        return pairs + 1  # (+ the uint8 decided flag)

    # -- per module -------------------------------------------------------------------------------
    def parameter_count(self, base: nn.Module) -> int:
        return 0 if self.dropped else self.factor_count(base)

    def stored_bytes(self, base: nn.Module) -> int:
        return self.parameter_count(base) * adapter_dtype(base).itemsize + 1  # (+ the uint8 marker)

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> LoRADropLayer:
        kind, in_features, out_features = linear_like(base, path, "LoRADrop", self.layer_types)
        if not isinstance(shared, DropShared) or shared.rank != self.rank:
            raise ValueError(
                f"LoRADrop: {path!r} overrides rank; a dropped module uses the pair its group shares, "
                "so rank must be the same everywhere"
            )
        group = group_of(path, base)
        if group not in shared.pairs:  # (only when wrap is given other modules than make_shared saw)
            raise ValueError(f"LoRADrop: {path!r} (group {group!r}) has no shared pair")
        pair = shared.pairs[group]
        assert isinstance(pair, DropPair)
        layer = LoRADropLayer(self, kind, in_features, out_features, adapter_dtype(base), pair, shared)
        if layer.lora_A is not None and layer.lora_B is not None:
            KaimingUniform().initialise(layer.lora_A.data, layer.lora_B.data, kind=kind, generator=generator)
        # The seed of the kept factors' fresh start at the decision: from the per-module generator.
        layer.seed = int(torch.randint(0, 2**62, (), generator=generator))
        return layer

    # -- the training-process hooks (deltatune.runtime.stepping) -----------------------------------------
    def for_steps(self, total: int, given: Collection[str]) -> LoRADrop:
        """A sampling phase of ``max(1, total // 10)`` steps unless given; refuses one that does not
        end before the run does (the pruned structure would never train)."""
        fitted = (
            self if "sample_steps" in given else dataclasses.replace(self, sample_steps=max(1, total // 10))
        )
        if fitted.sample_steps >= total:
            raise ValueError(
                f"LoRADrop.sample_steps must be < the run's {total} optimizer steps (the modules are chosen "
                f"at its end, and the pruned adapter then trains), got {fitted.sample_steps}"
            )
        return fitted

    def on_step(self, attachment: AdapterView, name: str, step: int, optimizer: Any) -> None:
        """At step ``sample_steps`` (or the first step after it, once): choose the modules, drop the
        others (see the module docstring)."""
        shared = attachment.shared(name)
        layers: dict[str, LoRADropLayer] = {}
        layers.update(layers_of(attachment, name, LoRADropLayer))
        if not isinstance(shared, DropShared):
            raise ValueError(f"LoRADrop.on_step: adapter {name!r} has no LoRA-drop shared state")
        if shared.is_decided:
            _record(attachment, name, layers)  # (after a resumed checkpoint: the overrides catch up)
            return
        if self.sample_steps == 0:
            raise ValueError(
                "LoRADrop.sample_steps must be >= 1 when training (0 means: fit it to the run); fit the "
                "method to the run (hooks(method).for_steps(total, given), as deltatune train does) or "
                "set sample_steps"
            )
        if step < self.sample_steps:
            return
        candidates = {p: layer for p, layer in layers.items() if not layer.is_dropped}
        kept = set(
            kept_by_importance({p: float(la.importance) for p, la in candidates.items()}, self.threshold)
        )
        touched: list[nn.Parameter] = []
        with torch.no_grad():
            for path, layer in candidates.items():
                assert layer.lora_A is not None and layer.lora_B is not None
                touched += [layer.lora_A, layer.lora_B]
                if path in kept:
                    layer.restart()
                else:
                    layer.dropped.fill_(1)
                    layer.lora_A.requires_grad_(False)
                    layer.lora_B.requires_grad_(False)
            for pair in shared.pairs.values():
                assert isinstance(pair, DropPair)
                pair.restart()
                touched += [pair.lora_A, pair.lora_B]
            shared.decided.fill_(1)
        if optimizer is not None:
            for p in touched:
                optimizer.state.pop(p, None)
        _record(attachment, name, layers)


def _record(attachment: Any, name: str, layers: Mapping[str, LoRADropLayer]) -> None:
    """Record the decision with the core: each dropped module's ``dropped`` field (kept as an
    exact-path override, so that a load re-creates the structure), and its own factors retired."""
    info = attachment.info(name)
    newly = [
        p
        for p, layer in layers.items()
        if layer.is_dropped and not getattr(info.configs[p], "dropped", False)
    ]
    for p in newly:
        attachment.set_module_fields(name, p, {"dropped": True})
        layer = layers[p]
        attachment.freeze(name, [t for t in (layer.lora_A, layer.lora_B) if isinstance(t, nn.Parameter)])


class LoRADropLayer(LowRankLayer):
    """One module's LoRA-drop update: its own (A, B) while kept, its group's shared pair once dropped."""

    lora_A: nn.Parameter | None  # noqa: N815 (the saved names, as LoRA's)
    lora_B: nn.Parameter | None  # noqa: N815
    importance: torch.Tensor
    dropped: torch.Tensor
    _pair: DropPair
    _shared: DropShared

    def __init__(
        self,
        config: LoRADrop,
        kind: str,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        pair: DropPair,
        shared: DropShared,
    ) -> None:
        super().__init__(kind, config.scale, config.dropout)
        self.config = config
        own = not config.dropped
        r = config.rank
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, dtype=dtype)) if own else None  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype)) if own else None  # (out, r)
        # Persistent (a checkpoint's step state): Σ ‖s·B A x‖² of the sampling phase, and the marker.
        self.register_buffer("importance", torch.zeros((), dtype=torch.float64))
        self.register_buffer("dropped", torch.tensor(0 if own else 1, dtype=torch.uint8))
        self.seed = 0  # (set by LoRADrop.wrap from the module's generator)
        self._dropped_memo: Memo[bool] = Memo()
        # Not submodules: the pair and the flag belong to the adapter's shared state, saved once.
        object.__setattr__(self, "_pair", pair)
        object.__setattr__(self, "_shared", shared)

    @property
    def is_dropped(self) -> bool:
        """Whether the module uses its group's shared pair."""
        return _flag(self._dropped_memo, self.dropped)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (A, B) in use: the group's shared pair once dropped (the very tensors), else its own."""
        if self.is_dropped or self.lora_A is None or self.lora_B is None:
            return self._pair.lora_A, self._pair.lora_B
        return self.lora_A, self.lora_B

    def collecting(self) -> bool:
        """Whether a forward now adds to the importance: a training forward (autograd records it and
        the factors train) of the sampling phase; an evaluation under ``no_grad`` does not count."""
        return (
            torch.is_grad_enabled()
            and self.lora_A is not None
            and self.lora_A.requires_grad
            and not self._shared.is_decided
            and not self.is_dropped
        )

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A x for the adapter's input ``x``; while sampling, ‖·‖² joins the importance."""
        A, B = self.factors()
        out = lowrank_delta(x, A, B, self.scale, self.dropout)  # (..., out)
        if self.collecting():
            with torch.no_grad():
                self.importance.add_(out.detach().to(self.importance.dtype).square().sum())
            # The group's pair, not used yet, takes part with a zero gradient: every trainable
            # parameter then has one (as DistributedDataParallel expects); it restarts at the decision.
            pair = self._pair
            out = out + 0.0 * (pair.lora_A.sum() + pair.lora_B.sum()).to(out.dtype)
        return out

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) for the fused kernel of :mod:`deltatune.kernels.lowrank`; None while dropout is active or
        while the importance is collected (then ``delta`` must run)."""
        return None if self.collecting() else super().lowrank_factors()

    def restart(self) -> None:
        """Fresh factors (A Kaiming-uniform from the layer's seed, B = 0): the kept module's new start."""
        assert self.lora_A is not None and self.lora_B is not None
        restart_factors(self.lora_A, self.lora_B, kind=self.kind, seed=self.seed)

    def export_state(self) -> dict[str, torch.Tensor]:
        """A kept module: its factors and the marker 0; a dropped one: the marker 1 only."""
        if self.is_dropped or self.lora_A is None or self.lora_B is None:
            return {"dropped": torch.ones((), dtype=torch.uint8)}
        return {
            "lora_A": self.lora_A.detach(),
            "lora_B": self.lora_B.detach(),
            "dropped": self.dropped.detach(),
        }

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_state` (the keys were checked against it)."""
        marker = int(state["dropped"])
        if marker != (0 if "lora_A" in state else 1):
            raise ValueError(f"LoRADrop: the marker 'dropped' = {marker} contradicts the saved factors")
        with torch.no_grad():
            if self.lora_A is not None and self.lora_B is not None:
                self.lora_A.copy_(state["lora_A"])
                self.lora_B.copy_(state["lora_B"])
            self.dropped.fill_(marker)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.config.rank}, scale={self.scale:g}, dropped={self.is_dropped}"
