"""ReLoRA: High-Rank Training Through Low-Rank Updates (Lialin et al. 2023), arXiv:2307.05695.

LoRA whose factors are folded away and restarted every ``restart_every`` optimizer steps, so that
the total update is a sum of rank-r updates and grows beyond rank r:

    y = W0 x + Σ_{i ≤ k} s · B_i A_i x + s · B A x,        s = alpha / r (alpha / sqrt(r): rsLoRA)

At a restart (``on_step`` at a step that ``restart_every`` divides, after ``optimizer.step()``):

1. fold: the current ``s · B A`` joins the accumulated update (B_{k+1}, A_{k+1} = B, A);
2. restart: A is drawn again (LoRA's Kaiming-uniform, from a generator seeded by the layer's seed and
   the step, so a run is reproducible and a resumed one continues identically), B = 0, so the output
   does not jump;
3. optimizer reset: in every optimizer state tensor of A and B shaped like them (Adam's ``exp_avg``
   and ``exp_avg_sq``, SGD's ``momentum_buffer``) all but the largest ``optimizer_keep`` fraction by
   magnitude are set to zero (the paper prunes 99 %; Adam's two moments with one mask, see
   :func:`prune_optimizer_state`);
4. jagged schedule: :meth:`ReLoRA.lr_factor` multiplies the run's own schedule (cosine in the
   paper) by a linear re-warm-up over ``rewarmup_steps`` after each restart.

The paper merges each fold into W. Here the base weight is never modified (``unload`` gives back the
base exactly), so the accumulated update lives in the layer's persistent buffers, in one of two forms
decided once from the config (the form that the saved file is smaller in):

* low-rank (``restarts · r · (in + out) <= in · out``): stacked factors ``folded_A = [A_1; ...; A_k]``
  (k·r, in) and ``folded_B = [B_1 | ... | B_k]`` (out, k·r), unscaled (s is the same for every
  fold, so no rounding is added). The forward pass concatenates them with the trained factors,
  ``[A; folded_A]`` and ``[B | folded_B]``, so the fused kernel of :mod:`deltatune.kernels.lowrank` still
  applies (rank (k+1)·r);
* dense (otherwise): ``folded_W = Σ s · B_i A_i`` (out, in), added as one more ``F.linear``.

In memory the buffers grow with k (no compute is spent on restarts that have not happened). The
saved file has one size fixed by the config, so that it loads into a freshly injected model:
``restarts`` (the number of restarts the adapter has room for; :meth:`ReLoRA.for_steps` sets it to
``total // restart_every``) rows of factors, those not yet used zero, plus the count ``folds`` done.

Closed forms, per adapted Linear/Conv1D with (in, out) = (in_features, out_features), R = restarts:

    trainable = r · (in + out)
    stored bytes = 4 · (r · (in + out) + F) + 8,   F = R · r · (in + out) if that is <= in · out else in · out

(float32 factors; 8 bytes: the int64 count of folds). :func:`effective_rank` measures the rank of
the total update (``delta_weight()``), to check that it grows beyond r. PEFT has no ReLoRA.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> from deltatune.methods.lowrank.relora import ReLoRA, effective_rank
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> att = dt.inject(net, ReLoRA(rank=2, restart_every=3, restarts=3, rewarmup_steps=1), targets=["0"])
    >>> att.closed_form("default")  # 2·32 trained; 4·(64 + 3·64) + 8 bytes stored
    (64, 1032)
    >>> opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    >>> x, y = torch.randn(32, 16), torch.randn(32, 16)
    >>> for step in range(1, 10):
    ...     (net(x) - y).square().mean().backward()
    ...     opt.step(); dt.on_step(net, step, opt); opt.zero_grad()
    >>> effective_rank(att.layers("default")["0"])  # three folds of rank 2
    6
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...contract import AdapterView, Suite, as_layer, layers_of, register
from ...contract.fields import Float, Int, param
from ...kernels.lowrank import lowrank_delta
from ...targets import shape_of
from .base import KaimingUniform, ScaledLowRank, adapter_dtype, linear_like, restart_factors
from .lora import LoRALayer, lora_of

__all__ = ["ReLoRA", "ReLoRALayer", "effective_rank", "prune_optimizer_state"]


@register
@dataclass(frozen=True, kw_only=True)
class ReLoRA(ScaledLowRank):
    """LoRA with periodic restarts: fold ``s · B A`` into an accumulated update, restart A and B.

    Fields (paper defaults in brackets):
        rank: r, the rank of each update [8, as LoRA; the paper uses 128 on 250M-1.3B models].
        alpha: scaling numerator; the update is scaled by alpha/r [8, as LoRA].
        dropout: dropout on the input of the trained factors (not of the folded update) [0.0].
        rank_stabilized: rsLoRA scaling alpha/sqrt(r) instead of alpha/r [False].
        restart_every: optimizer steps between restarts [5000, the paper's reset frequency].
        restarts: how many restarts the adapter has room for (sets the saved file's size);
            0: fitted by :meth:`for_steps` to ``total // restart_every`` [0].
        rewarmup_steps: steps of linear learning-rate re-warm-up after each restart; 0: none [50].
        optimizer_keep: fraction of each optimizer state tensor of A and B kept (the largest
            magnitudes) at a restart [0.01: the paper prunes 99 %].
    """

    restart_every: int = param(5000, Int(min=1), "optimizer steps between two restarts")
    restarts: int = param(
        0, Int(min=0), "restarts the adapter has room for (0: fitted by for_steps to total // restart_every)"
    )
    rewarmup_steps: int = param(50, Int(min=0), "steps of linear learning-rate re-warm-up after a restart")
    optimizer_keep: float = param(
        0.01, Float(0.0, 1.0, low_open=True), "fraction of A's and B's optimizer state kept at a restart"
    )

    name: ClassVar[str] = "relora"
    # (Not embeddings, the base's layer types: LoRA's embedding init (A = 0, B normal) would restart
    # with a jump.)
    suite: ClassVar[Suite] = Suite(
        example={"rank": 2, "restart_every": 2, "restarts": 2, "rewarmup_steps": 1}
    )

    def default_lr(self) -> float:
        """3e-3, as LoRA's; chosen on SST-2's validation split (MiniLM, query/value, a restart every 50
        of 150 steps: benchmarks/README.md, "Each method at its own learning rate"): 81.5 at 3e-3, 79.6
        at 1e-3, 77.4 at 1e-2."""
        return 3e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rewarmup_steps >= self.restart_every:
            raise ValueError(
                f"ReLoRA.rewarmup_steps must be < restart_every = {self.restart_every}, "
                f"got {self.rewarmup_steps}"
            )

    def dense(self, base: nn.Module) -> bool:
        """Whether the accumulated update is kept as one (out, in) matrix (smaller than the factors)."""
        in_features, out_features = shape_of(base)
        return self.restarts * self.rank * (in_features + out_features) > in_features * out_features

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> ReLoRALayer:
        kind, in_features, out_features = linear_like(base, path, "ReLoRA", self.layer_types)
        layer = ReLoRALayer(
            self, kind, in_features, out_features, adapter_dtype(base), base, self.dense(base)
        )
        KaimingUniform().initialise(layer.lora_A.data, layer.lora_B.data, kind=kind, generator=generator)
        # The seed of every restart's draw (with the step): from the per-module generator, after A.
        layer.seed.fill_(int(torch.randint(0, 2**62, (), generator=generator)))
        return layer

    def parameter_count(self, base: nn.Module) -> int:
        return self.factor_count(base)

    def stored_bytes(self, base: nn.Module) -> int:
        in_features, out_features = shape_of(base)
        folded = (
            in_features * out_features if self.dense(base) else self.restarts * self.parameter_count(base)
        )
        return (self.parameter_count(base) + folded) * adapter_dtype(base).itemsize + 8

    # -- the training-process hooks (deltatune.runtime.stepping) -----------------------------------------
    def for_steps(self, total: int, given: Collection[str]) -> ReLoRA:
        """Room for every restart of a ``total``-step run; refuses a run no longer than a period."""
        if self.restart_every >= total:
            raise ValueError(
                f"ReLoRA.restart_every must be < the run's {total} optimizer steps (else it never "
                f"restarts: plain LoRA), got {self.restart_every}; e.g. restart_every={max(1, total // 4)}"
            )
        needed = total // self.restart_every
        if "restarts" not in given:
            return dataclasses.replace(self, restarts=needed)
        if self.restarts < needed:
            raise ValueError(
                f"ReLoRA.restarts must be >= {needed} for a run of {total} steps restarting every "
                f"{self.restart_every}, got {self.restarts}"
            )
        return self

    def on_step(self, attachment: AdapterView, name: str, step: int, optimizer: Any) -> None:
        """At every multiple of ``restart_every``: fold, restart and prune the optimizer state."""
        due: list[ReLoRALayer] = []
        for path, layer in layers_of(attachment, name, ReLoRALayer).items():
            if step % layer.restart_every == 0:
                due.append(layer)
                if layer.folds >= layer.capacity:
                    # Checked for every layer before any changes: a refused step leaves no trace.
                    raise ValueError(
                        f"ReLoRA.restarts = {layer.capacity} leaves no room on {path!r} for the restart "
                        f"at step {step}; fit the method to the run (hooks(method).for_steps(total, given), "
                        "as deltatune train does) or set restarts"
                    )
        for layer in due:
            layer.restart(step)
            if optimizer is not None:
                prune_optimizer_state(optimizer, [layer.lora_A, layer.lora_B], layer.optimizer_keep)

    def lr_factor(self, step: int) -> float:
        """1 until the first restart; then ``min(1, (t + 1) / rewarmup_steps)``, t steps after it."""
        if self.rewarmup_steps == 0 or step < self.restart_every:
            return 1.0
        since = step % self.restart_every  # scheduler step `step` drives optimizer step step + 1
        return min(1.0, (since + 1) / self.rewarmup_steps)


def prune_optimizer_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], keep: float) -> None:
    """Zero all but the largest ``keep`` fraction (by magnitude) of the optimizer state of ``params``:
    every state tensor shaped like its parameter (Adam's moments, SGD's momentum); step counts stay.

    Adam's two moments are pruned with one mask, that of the largest ``exp_avg_sq``: pruned apart,
    an entry could keep its first moment and lose its second, and the next step, ``m / (sqrt(v) + eps)``,
    would be up to 1/sqrt(1 − beta2) ≈ 30 times too large there (a diverging restart on a toy
    regression). Without ``exp_avg_sq`` each tensor is pruned by its own magnitude.
    """
    for p in params:
        state = optimizer.state.get(p, {})
        tensors = [
            v
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.is_floating_point()
        ]
        shared = state.get("exp_avg_sq")
        shared_mask = (
            _top(shared, keep) if isinstance(shared, torch.Tensor) and shared.shape == p.shape else None
        )
        for value in tensors:
            mask = shared_mask if shared_mask is not None else _top(value, keep)
            if mask is not None:
                value.masked_fill_(~mask, 0.0)


def _top(value: torch.Tensor, keep: float) -> torch.Tensor | None:
    """The mask of the largest ``keep`` fraction of ``value`` by magnitude (None: all of it)."""
    kept = math.ceil(keep * value.numel())
    if kept >= value.numel():
        return None
    mask = torch.zeros(value.numel(), dtype=torch.bool, device=value.device)
    mask[value.reshape(-1).abs().topk(kept, sorted=False).indices] = True
    return mask.view_as(value)


def effective_rank(layer: nn.Module, *, rtol: float = 1e-4) -> int:
    """The numerical rank of the layer's total update ``delta_weight()``: the number of its singular
    values above ``rtol`` times the largest (computed in float64; 0 for a zero update).

    Example:
        >>> from torch import nn
        >>> import deltatune as dt
        >>> net = nn.Sequential(nn.Linear(8, 8))
        >>> att = dt.inject(net, dt.LoRA(rank=2), targets=["0"])
        >>> effective_rank(att.layers("default")["0"])  # B = 0 at init
        0
    """
    delta = as_layer(layer).delta_weight()
    if delta is None:
        raise ValueError(f"effective_rank: {type(layer).__name__} has no delta_weight()")
    with torch.no_grad():
        s = torch.linalg.svdvals(delta.detach().double())
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > rtol * s[0]).sum())


class ReLoRALayer(LoRALayer):
    """A LoRA layer plus the accumulated update of its restarts (see the module docstring)."""

    def __init__(
        self,
        config: ReLoRA,
        kind: str,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        base: nn.Module | None,
        dense: bool,
    ) -> None:
        super().__init__(lora_of(config), kind, in_features, out_features, dtype, base)
        self.restart_every = config.restart_every
        self.capacity = config.restarts
        self.optimizer_keep = config.optimizer_keep
        self.dense = dense
        # Accumulated update; the unused form stays empty. Persistent: the checkpoint's step state.
        self.folded_A: torch.Tensor
        self.folded_B: torch.Tensor
        self.folded_W: torch.Tensor
        self.register_buffer("folded_A", torch.zeros(0, in_features, dtype=dtype))  # (k·r, in)
        self.register_buffer("folded_B", torch.zeros(out_features, 0, dtype=dtype))  # (out, k·r)
        self.register_buffer("folded_W", torch.zeros(0, in_features, dtype=dtype))  # (out, in) once used
        self.folds_done: torch.Tensor
        self.seed: torch.Tensor
        self.register_buffer("folds_done", torch.zeros((), dtype=torch.int64))
        self.register_buffer("seed", torch.zeros((), dtype=torch.int64))  # not in the file (io.load reseeds)

    @property
    def folds(self) -> int:
        """Restarts done so far."""
        return int(self.folds_done)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with ``s · B A`` = the trained update plus the stacked folds (low-rank form)."""
        if self.folded_A.shape[0] == 0:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, self.folded_A]), torch.cat([self.lora_B, self.folded_B], dim=1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dropout, nn.Identity):
            A, B = self.factors()
            out = lowrank_delta(x, A, B, self.scale)  # (..., out)
        else:  # dropout acts on the trained factors' input only: the folds are part of the weight
            out = lowrank_delta(x, self.lora_A, self.lora_B, self.scale, self.dropout)
            if self.folded_A.shape[0]:
                out = out + lowrank_delta(x, self.folded_A, self.folded_B, self.scale)
        if self.folded_W.shape[0]:
            out = out + F.linear(x.to(out.dtype), self.folded_W.to(out.dtype))
        return out

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if self.folded_W.shape[0]:
            return None  # a dense fold: not a low-rank update
        return super().lowrank_factors()

    def lora_form(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if self.folded_W.shape[0]:
            return None  # a dense fold (dense=True): a full-rank update
        return super().lora_form()

    def delta_weight(self) -> torch.Tensor:
        delta = super().delta_weight()
        if self.folded_W.shape[0]:
            delta = delta + (self.folded_W if self.kind == "linear" else self.folded_W.t())
        return delta

    def restart(self, step: int) -> None:
        """Fold ``s · B A`` into the accumulated update; draw A again (seeded by ``step``), B = 0."""
        with torch.no_grad():
            if self.dense:
                update = (self.lora_B @ self.lora_A) * self.scale  # (out, in)
                self.folded_W = update if self.folded_W.shape[0] == 0 else self.folded_W + update
            else:
                self.folded_A = torch.cat([self.folded_A, self.lora_A.detach()])
                self.folded_B = torch.cat([self.folded_B, self.lora_B.detach()], dim=1)
            restart_factors(self.lora_A, self.lora_B, kind=self.kind, seed=_mix(int(self.seed), step))
            self.folds_done += 1

    def export_state(self) -> dict[str, torch.Tensor]:
        """The trained factors, the folds padded to ``restarts`` (a size fixed by the config), the count."""
        out = {
            "lora_A": self.lora_A.detach(),
            "lora_B": self.lora_B.detach(),
            "folds": self.folds_done.detach(),
        }
        if self.dense:
            W = self.folded_W
            out["folded_W"] = (
                W if W.shape[0] else self.lora_A.new_zeros(self.lora_B.shape[0], self.lora_A.shape[1])
            )
            return out
        rows = self.capacity * self.lora_A.shape[0] - self.folded_A.shape[0]
        out["folded_A"] = F.pad(self.folded_A, (0, 0, 0, rows))
        out["folded_B"] = F.pad(self.folded_B, (0, rows))
        return out

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_state`: the folds' buffers take the saved count's size."""
        folds = int(state["folds"])
        if not 0 <= folds <= self.capacity:
            raise ValueError(f"ReLoRA: the file holds {folds} folds, more than restarts = {self.capacity}")
        with torch.no_grad():
            self.lora_A.copy_(state["lora_A"])
            self.lora_B.copy_(state["lora_B"])
            self.folds_done.fill_(folds)
        like = self.lora_A
        if self.dense:
            W = state["folded_W"]
            self.folded_W = W.to(like) if folds else like.new_zeros(0, like.shape[1])
        else:
            rows = folds * like.shape[0]
            self.folded_A = state["folded_A"][:rows].to(like).clone()
            self.folded_B = state["folded_B"][:, :rows].to(like).clone()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folds={self.folds}/{self.capacity}, dense={self.dense}"


def _mix(seed: int, step: int) -> int:
    """A generator seed from the layer's seed and the step (splitmix64's constant), within int64."""
    return (seed ^ (step * 0x9E3779B97F4A7C15)) & (2**63 - 1)
