"""AM-LoRA: Learning Attentional Mixture of LoRAs for Language Model Continual Learning (Liu et al.
2024), arXiv:2409.19611.

Tasks are learnt one after another (:mod:`deltatune.continual`), one LoRA each, the earlier ones
frozen, as in O-LoRA. Instead of summing the task LoRAs, a small attention module on every adapted
module weighs their outputs per token, so that an input draws on the tasks that help it:

    h_i = s · B_i A_i x                                   (each task's output, i = 1..t)
    q = W_q x,   k_i = W_k h_i                            (W_q: (d, in), W_k: (d, out), d = attention_dim)
    g_i = σ(q · k_i / √d + b_i)                           (one gate per task and token)
    y = W0 x + Σ_i g_i h_i

and the loss adds ``sparsity · mean over modules and tokens of Σ_i |g_i|``, an L1 penalty that drives
the gates of the tasks an input does not need to zero, so that few LoRAs mix (less interference).
The mixer (W_q, W_k and the per-task biases b_i) keeps training with every new task.

The gates are independent sigmoids, not a softmax over tasks: the weights of a softmax always sum to
one, so an L1 penalty on them is a constant that cannot make them sparse. (The paper's exact
normalisation could not be checked here; this is the form on which its L1 term acts.) The penalty
reads the gates of the latest training forward pass, so it is added once per optimizer step, after
the forward of the step's last micro-batch, as :mod:`deltatune.runtime.stepping` does.

W_q starts like a Linear layer (Kaiming-uniform), W_k at zero, the biases at zero: at init every gate
is σ(0) = 1/2 and, with every B_i = 0, the output equals the base model's.

Closed forms, per adapted Linear/Conv1D with (in, out) = (in_features, out_features), t tasks,
d = attention_dim:

    trainable = r · (in + out) + d · (in + out) + t
    stored bytes = 4 · (t · r · (in + out) + d · (in + out) + t)

PEFT has no AM-LoRA; the mixture cannot be merged into the weights (the gates depend on the input).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> att = dt.continual.start(net, dt.AMLoRA(rank=2, attention_dim=4), "first", targets=["0"])
    >>> att = dt.continual.add_task(net, "second")
    >>> att.closed_form("continual")  # the new pair, the mixer (4·32) and two biases train
    (194, 1032)
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...contract import AdapterView, AdditiveLayer, Suite, register
from ...contract.fields import Float, Int, param
from ...targets import shape_of
from .base import adapter_dtype
from .task_loras import TaskLoRAs, TaskSequence


@register
@dataclass(frozen=True, kw_only=True)
class AMLoRA(TaskSequence):
    """One LoRA per task, mixed per token by a learned, sparsely gated attention over their outputs.

    Fields (defaults in brackets):
        rank: r of every task's LoRA [8].
        alpha: scale numerator, s = alpha / r [8, as LoRA].
        dropout: dropout on the adapter input [0.0].
        tasks: the task names, oldest first; the last one trains (:func:`deltatune.continual.add_task`
            appends one).
        attention_dim: d, the width of the mixer's queries and keys [16].
        sparsity: λ, weight of the L1 penalty on the gates [0.01].
    """

    attention_dim: int = param(16, Int(min=1), "d: width of the mixer's queries and keys")
    sparsity: float = param(0.01, Float(low=0.0), "λ: weight of the L1 penalty on the mixing gates")

    name: ClassVar[str] = "amlora"
    mergeable: ClassVar[bool] = False  # the gates depend on the input: no fixed weight update
    weight_space: ClassVar[bool] = False
    suite: ClassVar[Suite] = Suite(
        example={"rank": 2, "attention_dim": 4},
        variants={"three-tasks": {"fields": {"rank": 2, "attention_dim": 4, "tasks": ["a", "b", "c"]}}},
    )

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> AMLoRALayer:
        loras = self.task_loras(base, generator, path)
        return AMLoRALayer(loras, self.attention_dim, adapter_dtype(base), generator)

    def _mixer_count(self, base: nn.Module) -> int:
        in_features, out_features = shape_of(base)
        return self.attention_dim * (in_features + out_features) + len(self.tasks)

    def parameter_count(self, base: nn.Module) -> int:
        return self.factor_count(base) + self._mixer_count(base)

    def stored_bytes(self, base: nn.Module) -> int:
        lora = len(self.tasks) * self.factor_count(base)
        return (lora + self._mixer_count(base)) * adapter_dtype(base).itemsize

    def regularizer(self, attachment: AdapterView, name: str) -> torch.Tensor | None:
        """sparsity · the mean, over the modules that ran a training forward since the last call, of
        the mean over tokens of Σ_i g_i (gates are positive: that is their L1 norm)."""
        if self.sparsity == 0:
            return None
        norms = [
            n
            for layer in attachment.adapter_layers(name).values()
            if isinstance(layer, AMLoRALayer) and (n := layer.take_gate_norm()) is not None
        ]
        if not norms:
            return None
        return self.sparsity * torch.stack(norms).mean()


# The gates' L1 norm of each layer's latest training forward, kept outside the layer (a tensor in the
# autograd graph would make the model impossible to deepcopy) and dropped with the layer.
_GATE_NORMS: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


class AMLoRALayer(AdditiveLayer):
    """AM-LoRA on one module: the task LoRAs and their mixer."""

    def __init__(
        self, loras: TaskLoRAs, attention_dim: int, dtype: torch.dtype, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.loras = loras
        in_features = loras.lora_A[loras.newest].shape[1]
        out_features = loras.lora_B[loras.newest].shape[0]
        bound = 1.0 / math.sqrt(in_features)
        query = torch.empty(attention_dim, in_features, dtype=dtype).uniform_(
            -bound, bound, generator=generator
        )
        self.query = nn.Parameter(query)  # (d, in)
        self.key = nn.Parameter(torch.zeros(attention_dim, out_features, dtype=dtype))  # (d, out)
        self.gate_bias = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros((), dtype=dtype)) for t in loras.tasks}
        )

    def gates(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """g: (..., t), each task's gate for each token, from the input x and the task outputs h."""
        dtype = h.dtype  # (the compute dtype: lowrank.compute_dtype)
        q = F.linear(x.to(dtype), self.query.to(dtype))  # (..., d)
        k = F.linear(h, self.key.to(dtype))  # (..., t, d)
        scores = (k * q.unsqueeze(-2)).sum(-1) / math.sqrt(self.query.shape[0])
        bias = torch.stack([self.gate_bias[t] for t in self.loras.tasks]).to(dtype)  # (t,)
        return torch.sigmoid(scores + bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = self.loras.each(x)  # (..., t, out)
        g = self.gates(x, h)  # (..., t)
        if self.training and torch.is_grad_enabled():
            _GATE_NORMS[self] = g.sum(-1).mean()  # the L1 norm per token (gates are positive)
        return (g.unsqueeze(-1) * h).sum(-2)

    def take_gate_norm(self) -> torch.Tensor | None:
        """The gates' mean L1 norm of the latest training forward, once (None if none ran since)."""
        return _GATE_NORMS.pop(self, None)

    def extra_repr(self) -> str:
        return f"attention_dim={self.query.shape[0]}"
