"""O-LoRA: Orthogonal Subspace Learning for Language Model Continual Learning (Wang et al. 2023),
arXiv:2310.14152.

Tasks are learnt one after another (:mod:`deltatune.continual`). Task t trains a new LoRA while the
LoRAs of the earlier tasks stay frozen and active; at inference all of them are summed, so no task id
is needed:

    y = W0 x + Σ_{i ≤ t} s · B_i A_i x,        s = alpha / r

The loss of task t adds, over every adapted module,

    orthogonality · Σ_{i < t} ‖A_i A_tᵀ‖²_F  +  l2 · (‖A_t‖²_F + ‖B_t‖²_F)

The first term pushes the row space of the new A_t (the input directions the new task writes
through) away from those of the earlier tasks, so that learning task t changes little of what the
earlier LoRAs see; the second keeps the new update small. The paper's λ1 = ``orthogonality`` (0.5
in its scripts) and λ2 = ``l2`` (0 there). Its released code sums absolute entries of A_i A_tᵀ; this
follows the squared Frobenius norm of the paper's equation.

The summed update is a LoRA of rank t·r, so it merges (``delta_weight``) and runs through the fused
low-rank kernel. PEFT has no O-LoRA.

Closed forms, per adapted Linear/Conv1D with (in, out) = (in_features, out_features), t tasks:

    trainable = r · (in + out)  (the newest task)      stored bytes = 4 · t · r · (in + out)

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> att = dt.continual.start(net, dt.OLoRA(rank=2), "first", targets=["0"])
    >>> att = dt.continual.add_task(net, "second")
    >>> att.closed_form("continual")  # one task's pair trains, two are stored
    (64, 512)
    >>> float(dt.regularization(net)) > 0  # the new A against the first task's
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...contract import AdapterView, LowRankLayer, Suite, layers_of, register
from ...contract.fields import Float, param
from .base import adapter_dtype
from .task_loras import TaskLoRAs, TaskSequence


@register
@dataclass(frozen=True, kw_only=True)
class OLoRA(TaskSequence):
    """One LoRA per task, the earlier ones frozen, the new one kept orthogonal to them.

    Fields (paper defaults in brackets):
        rank: r of every task's LoRA [8].
        alpha: scale numerator, s = alpha / r [8, as LoRA].
        dropout: dropout on the adapter input [0.0].
        tasks: the task names, oldest first; the last one trains (:func:`deltatune.continual.add_task`
            appends one).
        orthogonality: λ1, weight of Σ_{i<t} ‖A_i A_tᵀ‖² [0.5].
        l2: λ2, weight of the new task's ‖θ_t‖² [0.0].
    """

    orthogonality: float = param(0.5, Float(low=0.0), "λ1: weight of Σ_{i<t} ‖A_i A_tᵀ‖² in the loss")
    l2: float = param(0.0, Float(low=0.0), "λ2: weight of the new task's ‖A_t‖² + ‖B_t‖² in the loss")

    name: ClassVar[str] = "olora"
    suite: ClassVar[Suite] = Suite(
        example={"rank": 2},
        variants={"three-tasks": {"fields": {"rank": 2, "tasks": ["a", "b", "c"], "l2": 0.1}}},
    )

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> OLoRALayer:
        return OLoRALayer(self.task_loras(base, generator, path))

    def parameter_count(self, base: nn.Module) -> int:
        return self.factor_count(base)

    def stored_bytes(self, base: nn.Module) -> int:
        return len(self.tasks) * self.parameter_count(base) * adapter_dtype(base).itemsize

    def regularizer(self, attachment: AdapterView, name: str) -> torch.Tensor | None:
        """λ1 · Σ_modules Σ_{i<t} ‖A_i A_tᵀ‖²_F + λ2 · Σ_modules ‖θ_t‖²; None while the newest task
        does not train (a loaded, frozen sequence) or both weights are 0."""
        terms: list[torch.Tensor] = []
        for layer in layers_of(attachment, name, OLoRALayer).values():
            loras = layer.loras
            A_t = loras.lora_A[loras.newest]
            if not A_t.requires_grad:
                continue
            if self.orthogonality > 0:
                for task in loras.tasks[:-1]:
                    terms.append(self.orthogonality * (loras.lora_A[task] @ A_t.T).square().sum())
            if self.l2 > 0:
                B_t = loras.lora_B[loras.newest]
                terms.append(self.l2 * (A_t.square().sum() + B_t.square().sum()))
        if not terms:
            return None
        return torch.stack(terms).sum()


class OLoRALayer(LowRankLayer):
    """O-LoRA on one module: the sum of every task's LoRA, ``s · [B_1 | ...] [A_1; ...]`` (rank t·r)."""

    def __init__(self, loras: TaskLoRAs) -> None:
        super().__init__(loras.kind, loras.scale, 0.0)
        self.loras = loras
        self.dropout = loras.dropout  # (the one module: no parameters, nothing saved twice)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loras.stacked()
