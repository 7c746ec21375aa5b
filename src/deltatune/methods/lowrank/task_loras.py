"""One LoRA per task on one module: the part that O-LoRA and AM-LoRA share (continual learning).

A continual adapter learns tasks one after another (:mod:`deltatune.continual`). On each adapted
module it holds one pair of LoRA factors per task, keyed by the task's name:

    A_i: (r, in),  B_i: (out, r),   h_i(x) = s · B_i A_i x,   s = alpha / r

Only the newest task's pair trains; the earlier tasks' pairs are frozen when the layer is built
(``requires_grad=False``), so an adapter re-created with one more task (``continual.add_task``)
trains exactly the new task. Every pair starts as LoRA's does (A Kaiming-uniform, B = 0), drawn in
task order from the module's generator, so a task's initial factors do not depend on how many tasks
come after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...contract.fields import Names, param
from ...kernels.lowrank import compute_dtype
from .base import ScaledLowRank, adapter_dtype, linear_like


class TaskLoRAs(nn.Module):
    """The per-task factors of one module (``lora_A[task]``, ``lora_B[task]``); the newest trains."""

    def __init__(
        self,
        tasks: Sequence[str],
        rank: int,
        scale: float,
        dropout: float,
        base: nn.Module,
        generator: torch.Generator,
        path: str,
        method: str,
    ) -> None:
        super().__init__()
        kind, in_features, out_features = linear_like(base, path, method, ("linear", "conv1d"))
        self.kind = kind
        self.tasks = tuple(tasks)
        self.scale = scale
        dtype = adapter_dtype(base)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        bound = 1.0 / math.sqrt(in_features)
        for i, task in enumerate(self.tasks):
            A = torch.empty(rank, in_features, dtype=dtype).uniform_(-bound, bound, generator=generator)
            B = torch.zeros(out_features, rank, dtype=dtype)
            newest = i == len(self.tasks) - 1
            self.lora_A[task] = nn.Parameter(A, requires_grad=newest)
            self.lora_B[task] = nn.Parameter(B, requires_grad=newest)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def newest(self) -> str:
        return self.tasks[-1]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[A_1; ...; A_t]`` (t·r, in) and ``[B_1 | ... | B_t]`` (out, t·r): Σ_i s B_i A_i = s B A."""
        A = torch.cat([self.lora_A[t] for t in self.tasks])
        B = torch.cat([self.lora_B[t] for t in self.tasks], dim=1)
        return A, B

    def each(self, x: torch.Tensor) -> torch.Tensor:
        """Every task's output ``h_i(x)``, stacked on a new next-to-last axis: (..., t, out)."""
        dtype = compute_dtype(x, self.lora_A[self.newest])
        x = self.dropout(x.to(dtype))
        outs = [
            F.linear(F.linear(x, self.lora_A[t].to(dtype)) * self.scale, self.lora_B[t].to(dtype))
            for t in self.tasks
        ]
        return torch.stack(outs, dim=-2)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, tasks={list(self.tasks)}, scale={self.scale:g}"


@dataclass(frozen=True, kw_only=True)
class TaskSequence(ScaledLowRank):
    """A continual method (``task_sequence``): one LoRA per task on every adapted module, the tasks
    named by ``tasks`` (oldest first; the last one trains; ``continual.add_task`` appends one)."""

    tasks: tuple[str, ...] = param(
        ("task",), Names(), "the tasks learnt so far, oldest first; the last one trains"
    )

    task_sequence: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.tasks, list):  # accept a list of names as the tuple the frozen config holds
            object.__setattr__(self, "tasks", tuple(self.tasks))
        super().__post_init__()

    def task_loras(self, base: nn.Module, generator: torch.Generator, path: str) -> TaskLoRAs:
        """This module's per-task factors, drawn in task order from the module's generator."""
        return TaskLoRAs(
            self.tasks, self.rank, self.scale, self.dropout, base, generator, path, type(self).__name__
        )
