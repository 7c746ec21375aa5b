"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al. 2023),
arXiv:2303.10512.

The update is kept in SVD form, and the rank budget moves during training to the layers that need it:

    y = W0 x + (alpha / (r0 + 1e-5)) · P Λ Q dropout(x),    P: (out, r0),  Λ = diag(E): (r0, 1),  Q: (r0, in)

with r0 = ``init_r`` (PEFT's ``ranknum``, which stays r0 after pruning, so the scale never changes),
E = 0 at init (the model equals the base) and P, Q ~ N(0, 0.02²). Training adds the orthogonality
regulariser (the ``regularizer`` hook), averaged over every P and Q of the adapter as PEFT does, with
unsquared Frobenius norms:

    R = orth_reg_weight · mean over layers and factors of ( ‖QQᵀ − I‖_F , ‖PᵀP − I‖_F )

After each optimizer step (the ``on_step`` hook) the sensitivity I = |w · ∂L/∂w| of every entry of
P, E, Q is smoothed, Ī ← β1 Ī + (1 − β1) I and Ū ← β2 Ū + (1 − β2) |I − Ī|, and the triplet i scores
S_i = s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji) with s = Ī · Ū. The budget b(t) (singular values kept
over all layers) follows the cubic schedule of the paper, eq. (8): b = r0·n for t ≤ tinit, then
b = n·target_r + (n·r0 − n·target_r)(1 − (t − tinit)/(T − tfinal − tinit))³ (floored), set every
``delta_t`` steps by zeroing the E_i whose S_i is among the n·r0 − b lowest, and b = n·target_r from
t = T − tfinal on, where the mask is final and is applied after every step. The EMAs and the masks are
persistent buffers of the layers (checkpointed by :func:`deltatune.runtime.stepping.step_state`).

Step numbering: ``on_step(step)`` (optimizer steps done, from 1) is PEFT's
``update_and_allocate(step − 1)``, the ``global_step`` of PEFT's examples (counted from 0 and
incremented after the call): after the same number of steps both have the same masks.

Saving keeps only the surviving triplets: once a layer is masked to k < r0 singular values, its saved
A, E, B hold k rows (columns of B), the adapter's config records ``kept_rank=k`` for that module, and
loading builds a rank-k layer with the same scale (PEFT's ``rank_pattern``). Between two budget-phase
masks the optimizer may make masked E_i non-zero again until the next mask; a save then drops them,
as PEFT's does.

Closed forms, per adapted module with (in, out) = (in_features, out_features) and r = ``kept_rank``
when set, else ``init_r``:

    trainable = stored = r · (in + out + 1)        stored bytes = 4 · r · (in + out + 1)   (float32)

While training the layers keep r0 triplets (pruning only zeroes E), so after the first mask the
stored size is r · (in + out + 1) with r the surviving rank, which is only known at run time.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> from deltatune.methods.lowrank.adalora import AdaLoRA
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    >>> method = AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=1).for_steps(6, given=())
    >>> att = dt.inject(net, method, targets=["0", "2"])
    >>> att.closed_form("default")  # 4 · (16 + 16 + 1) + 4 · (16 + 4 + 1)
    (216, 864)
    >>> opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    >>> for step in range(1, 7):
    ...     loss = net(torch.randn(8, 16)).square().mean() + dt.regularization(net)
    ...     loss.backward(); opt.step(); dt.on_step(net, step, opt); opt.zero_grad()
    >>> sum(int(la.rank_mask.sum()) for la in att.layers("default").values())  # 2 layers × target_r
    4
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...contract import AdapterView, AdditiveLayer, Method, Suite, dropout_module, register
from ...contract.fields import Float, Int, IntOrNone, param
from ...kernels.lowrank import compute_dtype
from ...targets import shape_of
from .base import adapter_dtype, linear_like

_KINDS = ("linear", "conv1d")
_FACTORS = ("lora_A", "lora_E", "lora_B")  # saved tensors, and PEFT's names
# Fields that act on the whole adapter (the budget is global): the same for every module.
_GLOBAL = ("target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight", "total_step")


@register
@dataclass(frozen=True, kw_only=True)
class AdaLoRA(Method):
    """SVD-form low-rank update whose rank budget is reallocated by importance during training.

    Fields (PEFT's defaults in brackets; the paper tunes them per task):
        init_r: r0, the triplets each module starts with [12].
        target_r: the average rank per module at the end; the final budget is n · target_r [8].
        alpha: scale numerator; the update is scaled by alpha / (init_r + 1e-5) [8].
        dropout: dropout on the adapter's input [0.0].
        tinit: warm-up steps before any pruning [0].
        tfinal: final steps with the budget fixed at n · target_r [0].
        delta_t: steps between two budget allocations (PEFT's ``deltaT``) [1].
        beta1: EMA coefficient of the sensitivity [0.85].
        beta2: EMA coefficient of its uncertainty [0.85].
        orth_reg_weight: weight of the orthogonality regulariser [0.5 (the paper uses 0.1)].
        total_step: optimizer steps of the run, T; :meth:`for_steps` fills it in [None: required by
            ``on_step``].
        kept_rank: triplets this module keeps after pruning, the saved form (set per module by the
            rank allocation and read back by ``load``; PEFT's ``rank_pattern``) [None: init_r].
    """

    init_r: int = param(12, Int(min=1), "initial rank r0 of every module")
    target_r: int = param(8, Int(min=1), "average rank per module after pruning (<= init_r)")
    alpha: float = param(8.0, Float(low=0.0, low_open=True), "scale numerator: update is alpha/init_r · PΛQ")
    dropout: float = param(0.0, Float(0.0, 1.0, high_open=True), "dropout probability on the adapter input")
    tinit: int = param(0, Int(min=0), "warm-up steps before the budget starts to shrink")
    tfinal: int = param(0, Int(min=0), "final steps with the budget fixed at its target")
    delta_t: int = param(1, Int(min=1), "steps between two budget allocations (PEFT's deltaT)")
    beta1: float = param(0.85, Float(0.0, 1.0, low_open=True, high_open=True), "EMA of the sensitivity")
    beta2: float = param(0.85, Float(0.0, 1.0, low_open=True, high_open=True), "EMA of the uncertainty")
    orth_reg_weight: float = param(0.5, Float(low=0.0), "weight of the orthogonality regulariser")
    total_step: int | None = param(None, IntOrNone(min=1), "optimizer steps of the run (for_steps sets it)")
    kept_rank: int | None = param(None, IntOrNone(min=0), "triplets kept after pruning (the saved form)")

    # (Not a LowRank: its rank is init_r, pruned to kept_rank, and the scale divides by r0 as PEFT's.)
    name: ClassVar[str] = "adalora"

    def default_lr(self) -> float:
        """2e-2: P and Q start at N(0, 0.02²) and Λ at zero, so ΔW = PΛQ grows far slower than LoRA's at one
        rate (at 1e-3 it stays at chance in 150 steps); chosen on SST-2's validation split (MiniLM,
        query/value, 150 steps: benchmarks/README.md, "Each method at its own learning rate"): 81.4 at 2e-2,
        81.3 at 6e-2, 56.3 at 6.7e-3."""
        return 2e-2

    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    weight_space: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    layer_types: ClassVar[tuple[str, ...]] = _KINDS
    suite: ClassVar[Suite] = Suite(example={"init_r": 4, "target_r": 2, "total_step": 10})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_r > self.init_r:
            raise ValueError(
                f"AdaLoRA.target_r must be <= init_r ({self.init_r}): pruning only removes triplets, "
                f"got {self.target_r}"
            )
        if self.kept_rank is not None and self.kept_rank > self.init_r:
            raise ValueError(f"AdaLoRA.kept_rank must be <= init_r ({self.init_r}), got {self.kept_rank}")
        if self.total_step is not None and self.tinit + self.tfinal >= self.total_step:
            raise ValueError(
                f"AdaLoRA.total_step must be > tinit + tfinal ({self.tinit} + {self.tfinal}), leaving "
                f"steps to allocate the budget in, got {self.total_step}; lower tinit or tfinal"
            )

    @property
    def rank(self) -> int:
        """The triplets a layer of this config holds."""
        return self.init_r if self.kept_rank is None else self.kept_rank

    # -- layers ---------------------------------------------------------------------------------
    def make_shared(self, bases: Mapping[str, nn.Module], generator: torch.Generator) -> Schedule:
        return Schedule(self)

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> AdaLoRALayer:
        kind, in_features, out_features = linear_like(base, path, "AdaLoRA", self.layer_types)
        if not isinstance(shared, Schedule):
            raise ValueError(f"AdaLoRA: {path!r} got no shared schedule")
        for field in _GLOBAL:
            mine, theirs = getattr(self, field), getattr(shared.method, field)
            if mine != theirs:
                raise ValueError(
                    f"AdaLoRA: {path!r} overrides {field} ({mine} vs the adapter's {theirs}); the rank "
                    f"budget is allocated over all modules at once, so {field} must be the same everywhere"
                )
        layer = AdaLoRALayer(self, kind, in_features, out_features, adapter_dtype(base))
        with torch.no_grad():  # E = 0 (the base at init); P, Q ~ N(0, 0.02²) as PEFT
            layer.lora_A.normal_(0.0, 0.02, generator=generator)
            layer.lora_B.normal_(0.0, 0.02, generator=generator)
        return layer

    def parameter_count(self, base: nn.Module) -> int:
        in_features, out_features = shape_of(base)
        return self.rank * (in_features + out_features + 1)

    def stored_bytes(self, base: nn.Module) -> int:
        return self.parameter_count(base) * adapter_dtype(base).itemsize

    # -- the training process (deltatune.runtime.stepping calls these) -----------------------------------
    def for_steps(self, total: int, given: Collection[str]) -> AdaLoRA:
        """A copy with ``total_step=total`` unless the user gave it; refuses a schedule that does not
        leave steps to allocate the budget in."""
        steps = self.total_step if "total_step" in given and self.total_step is not None else total
        if self.tinit + self.tfinal >= steps:
            raise ValueError(
                f"AdaLoRA.tinit + AdaLoRA.tfinal ({self.tinit} + {self.tfinal}) must be < the run's "
                f"{steps} optimizer steps (total_step), leaving steps to allocate the budget in; lower "
                "tinit or tfinal, or train longer"
            )
        return self if steps == self.total_step else dataclasses.replace(self, total_step=steps)

    def regularizer(self, attachment: AdapterView, name: str) -> torch.Tensor | None:
        """orth_reg_weight · the mean of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F over the adapter's layers."""
        if self.orth_reg_weight == 0:
            return None
        total: torch.Tensor | None = None
        count = 0
        for layer in _layers(attachment, name).values():
            for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # (r, r)
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                term = torch.norm(cov - eye, p="fro")
                total = term if total is None else total + term
                count += 1
        if total is None:
            return None
        return self.orth_reg_weight * (total / count)

    def budget(self, t: int, initial: int, final: int) -> tuple[int, bool]:
        """(triplets kept over all layers, whether to mask now) at PEFT's step ``t`` (from 0)."""
        T = self._total()
        if t <= self.tinit:
            return initial, False
        if t > T - self.tfinal:
            return final, True
        progress = 1 - (t - self.tinit) / (T - self.tfinal - self.tinit)
        return int((initial - final) * (progress**3) + final), t % self.delta_t == 0

    def on_step(self, attachment: AdapterView, name: str, step: int, optimizer: Any) -> None:
        """Update the importance averages and allocate the budget: PEFT's
        ``update_and_allocate(step − 1)``."""
        T = self._total()
        t = step - 1
        layers = _layers(attachment, name)
        if not any(p.requires_grad for la in layers.values() for p in la.parameters()):
            return  # a frozen adapter (loaded for inference) does not train: nothing to allocate
        last = T - self.tfinal  # the step at which the final budget is set
        if t < last:
            for layer in layers.values():
                layer.update_importance(self.beta1, self.beta2)
            budget, now = self.budget(t, *self._budgets(layers))
            if now:
                self._mask_to_budget(attachment, name, layers, budget)
        elif t == last:
            self._mask_to_budget(attachment, name, layers, self.budget(t, *self._budgets(layers))[0])
            for layer in layers.values():
                layer.reset_importance()
        else:
            for layer in layers.values():
                layer.apply_mask()
            _record_kept_ranks(attachment, name, layers)  # (again after a resume from step_state)

    def _total(self) -> int:
        if self.total_step is None:
            raise ValueError(
                "AdaLoRA.total_step is None: the budget schedule needs the run's number of optimizer "
                "steps; pass total_step=... or fit the method with for_steps(total, given)"
            )
        return self.total_step

    def _budgets(self, layers: Mapping[str, AdaLoRALayer]) -> tuple[int, int]:
        """(initial, final) budget: every triplet the layers hold, and target_r per layer."""
        return sum(la.rank for la in layers.values()), self.target_r * len(layers)

    def _mask_to_budget(
        self, attachment: AdapterView, name: str, layers: Mapping[str, AdaLoRALayer], budget: int
    ) -> None:
        """Zero the E of the lowest-scoring triplets over all layers, keeping ``budget`` of them."""
        schedule = attachment.shared(name)
        if isinstance(schedule, Schedule):
            schedule.budget.fill_(budget)
        scores = {path: layer.triplet_scores() for path, layer in layers.items()}
        drop = sum(la.rank for la in layers.values()) - budget
        if drop > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=drop)[0].item()
            for path, layer in layers.items():
                layer.set_mask(~(scores[path] <= threshold))
        _record_kept_ranks(attachment, name, layers)


class Schedule(nn.Module):
    """The adapter-wide part (the budget is global): its configuration, which lets ``wrap`` refuse
    per-module overrides of the schedule, and ``budget``, the number of singular values the last
    allocation kept over all layers (0 before the first; recomputed from the step, so not saved)."""

    def __init__(self, method: AdaLoRA) -> None:
        super().__init__()
        self.method = method
        self.budget: torch.Tensor
        self.register_buffer("budget", torch.zeros((), dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        return f"target_r={self.method.target_r}, total_step={self.method.total_step}"


def _layers(attachment: AdapterView, name: str) -> dict[str, AdaLoRALayer]:
    """The adapter's AdaLoRA layers (not its ``modules_to_save`` copies), in model order."""
    return {p: la for p, la in attachment.adapter_layers(name).items() if isinstance(la, AdaLoRALayer)}


def _record_kept_ranks(attachment: AdapterView, name: str, layers: Mapping[str, AdaLoRALayer]) -> None:
    """Record each masked layer's surviving rank as its module's ``kept_rank`` (the core keeps it as an
    exact-path override), so that a save holds only those triplets and a load re-creates them."""
    for path, layer in layers.items():
        kept = int(layer.rank_mask.sum())
        value = None if kept == layer.rank else kept
        if layer.config.kept_rank == value:
            continue
        attachment.set_module_fields(name, path, {"kept_rank": value})
        layer.config = dataclasses.replace(layer.config, kept_rank=value)


class AdaLoRALayer(AdditiveLayer):
    """The trainable triplets of one AdaLoRA-adapted module and their importance state."""

    def __init__(
        self, config: AdaLoRA, kind: str, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.config = config
        self.kind = kind
        self.scaling = config.alpha
        r = config.rank
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, dtype=dtype))  # Q, (r, in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=dtype))  # Λ, (r, 1)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype))  # P, (out, r)
        self.dropout = dropout_module(config.dropout)
        # r0 as a tensor, divided by as PEFT does (its ranknum + 1e-5), so outputs match to the bit.
        self.ranknum: torch.Tensor
        self.register_buffer("ranknum", torch.full((1,), float(config.init_r), dtype=dtype), persistent=False)
        self.rank_mask: torch.Tensor
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool))  # triplets kept so far
        for factor in _FACTORS:  # the smoothed sensitivity and its uncertainty, per entry
            shape = getattr(self, factor).shape
            self.register_buffer(f"{factor}_sensitivity", torch.zeros(shape, dtype=dtype))
            self.register_buffer(f"{factor}_uncertainty", torch.zeros(shape, dtype=dtype))

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / (r0 + 1e-5)) · P Λ Q x, computed in PEFT's order."""
        A, E, B = self.lora_A, self.lora_E, self.lora_B
        dtype = compute_dtype(x, A)
        h: torch.Tensor = self.dropout(x.to(dtype)) @ (A * E).to(dtype).T @ B.to(dtype).T  # (..., out)
        return h * self.scaling / (self.ranknum + 1e-5)

    def delta_weight(self) -> torch.Tensor:
        """The update in the layout of the base weight: (out, in) for Linear, transposed for Conv1D."""
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)
        return delta if self.kind == "linear" else delta.T

    def lora_form(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The kept triplets as a plain LoRA: ``A = (Λ Q)[kept]``, ``B = P[:, kept]`` (rank = triplets
        kept), scale ``alpha / (r0 + 1e-5)``."""
        keep = self.rank_mask
        A = (self.lora_A * self.lora_E)[keep].detach()
        B = self.lora_B[:, keep].detach()
        return A, B, self.scaling / (float(self.ranknum[0]) + 1e-5)

    # -- importance (PEFT's RankAllocator, per layer) ---------------------------------------------
    def _state(self) -> Iterator[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
        for factor in _FACTORS:
            yield (
                getattr(self, factor),
                getattr(self, f"{factor}_sensitivity"),
                getattr(self, f"{factor}_uncertainty"),
            )

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """Ī ← β1 Ī + (1 − β1) |w ∂L/∂w|,  Ū ← β2 Ū + (1 − β2) |I − Ī| (after the optimizer step)."""
        for p, sensitivity, uncertainty in self._state():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            ipt = (p * grad).abs().detach()
            smoothed = beta1 * sensitivity + (1 - beta1) * ipt
            uncertainty.copy_(beta2 * uncertainty + (1 - beta2) * (ipt - smoothed).abs())
            sensitivity.copy_(smoothed)

    @torch.no_grad()
    def reset_importance(self) -> None:
        for _, sensitivity, uncertainty in self._state():
            sensitivity.zero_()
            uncertainty.zero_()

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S_i = s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji), s = Ī · Ū; shape (r,)."""
        s_A, s_E, s_B = (sens * unc for _, sens, unc in self._state())
        q = s_A.mean(dim=1, keepdim=True)  # (r, 1)
        p = s_B.mean(dim=0, keepdim=False).view(-1, 1)  # (r, 1)
        return s_E.view(-1) + torch.cat([q, p], dim=1).sum(dim=1).view(-1)

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        self.rank_mask.copy_(keep.view(-1))
        self.apply_mask()

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)

    # -- what a file holds ----------------------------------------------------------------------
    def export_state(self) -> dict[str, torch.Tensor]:
        """A, E, B; once the rank allocation recorded a kept rank, only the kept triplets."""
        A, E, B = self.lora_A.detach(), self.lora_E.detach(), self.lora_B.detach()
        if self.config.kept_rank is None or self.config.kept_rank == self.rank:
            return {"lora_A": A, "lora_E": E, "lora_B": B}
        keep = self.rank_mask.nonzero().view(-1)
        if keep.numel() != self.config.kept_rank:
            raise ValueError(
                f"AdaLoRA: the layer keeps {keep.numel()} triplets but its config records "
                f"kept_rank={self.config.kept_rank}"
            )
        return {"lora_A": A[keep], "lora_E": E[keep], "lora_B": B[:, keep]}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """The saved triplets (the layer was built with the file's kept rank); importance state reset."""
        self.load_state_dict({**self.state_dict(), **state}, strict=True)
        self.reset_importance()
        self.rank_mask.fill_(True)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rank={self.rank}, init_r={self.config.init_r}, scale={self.scaling:g}/r0"


__all__ = ["AdaLoRA", "AdaLoRALayer", "Schedule"]
