"""Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices (Zi et al. 2023),
arXiv:2309.02411.

LoRA that also moves the weight it adapts, by λ times the change of the low-rank update between
consecutive optimizer steps, once the first K steps (``warmup_steps``) are done:

    y = W_t x + s · B_t A_t x,     W_{t+1} = W_t + λ · s · (B_{t+1} A_{t+1} − B_t A_t)   for t >= K

W receives no gradient (nothing of W's size is stored: no gradient, no optimizer moments), and the
paper drops dropout on the adapter's input so that the delta of ``B A`` stands for W's gradient step.

The base weight is never modified here (``unload`` gives the base back exactly). The sum telescopes:

    W_T = W_0 + λ · s · (B_T A_T − B_K A_K)          (T >= K; W_T = W_0 before)

so the layer keeps a frozen snapshot (A_K, B_K), taken by ``on_step`` at step K (at ``inject`` when
K = 0), in persistent buffers, and computes

    y = W_0 x + s · B A x + λ · s · (sg(B) sg(A) − B_K A_K) x          (sg: stop-gradient)

which equals the paper's output with the same gradients for A and B: the λ-term uses detached
factors, as W gets no gradient in the paper. Written as one low-rank product of rank 3r,
``[A; sg(A); A_K]`` and ``[B | λ sg(B) | −λ B_K]``, it runs through the fused kernel of
:mod:`deltatune.kernels.lowrank` (rank r before step K). Merging gives ``W_0 + s (1 + λ) B A − λ s B_K A_K``.

Closed forms, per adapted Linear/Conv1D with (in, out) = (in_features, out_features):

    trainable = r · (in + out)        stored bytes = 4 · 2r · (in + out) + 1

(float32 A, B and the snapshot A_K, B_K; 1 byte: whether the snapshot is taken). PEFT has no
Delta-LoRA. A 4-bit (NF4) base is refused: Delta-LoRA updates W, which 4 bits cannot hold.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> from deltatune.methods.lowrank.delta_lora import DeltaLoRA
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> att = dt.inject(net, DeltaLoRA(rank=4, warmup_steps=2), targets=["0"])
    >>> att.closed_form("default")  # 4·32 trained; A, B, A_K, B_K and a flag stored
    (128, 1025)
    >>> opt = torch.optim.AdamW(dt.trainable_parameters(net), lr=1e-2)
    >>> x = torch.randn(8, 16)
    >>> for step in range(1, 5):
    ...     net(x).square().mean().backward()
    ...     opt.step(); dt.on_step(net, step, opt); opt.zero_grad()
    >>> att.layers("default")["0"].started
    True
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...contract import AdapterView, Suite, layers_of, register
from ...contract.fields import Float, Int, param
from .base import KaimingUniform, ScaledLowRank, adapter_dtype, linear_like
from .lora import LoRALayer, lora_of

__all__ = ["DeltaLoRA", "DeltaLoRALayer"]


@register
@dataclass(frozen=True, kw_only=True)
class DeltaLoRA(ScaledLowRank):
    """LoRA whose delta ``B_{t+1} A_{t+1} − B_t A_t`` also updates W (held as a snapshot, see above).

    Fields (paper defaults in brackets; as we read the paper's hyper-parameter tables, not re-checked):
        rank: r, the rank of B A [8, as LoRA].
        alpha: scaling numerator; the update is scaled by alpha/r [8, as LoRA].
        rank_stabilized: rsLoRA scaling alpha/sqrt(r) instead of alpha/r [False].
        lam: λ, the update ratio of W [2].
        warmup_steps: K, optimizer steps of plain LoRA before W starts moving [500].
        dropout: must stay 0: the paper removes dropout from the low-rank branch.
    """

    lam: float = param(2.0, Float(low=0.0), "lambda: W moves by lam times the step's change of s·B A")
    warmup_steps: int = param(500, Int(min=0), "K: optimizer steps of plain LoRA before W starts moving")

    name: ClassVar[str] = "delta_lora"
    # W is updated in the paper: a 4-bit base cannot take the update (refused by inject and quantize).
    quantized_base: ClassVar[bool] = False
    float_base_reason: ClassVar[str] = (
        "Delta-LoRA updates W itself (W += λ·(the step's change of s·B A) every step), which cannot be "
        "done in 4 bits"
    )
    suite: ClassVar[Suite] = Suite(example={"rank": 2, "warmup_steps": 0})

    def default_lr(self) -> float:
        """3e-3, as LoRA's; chosen on SST-2's validation split (MiniLM, query/value, λ = 2, 150 steps:
        benchmarks/README.md, "Each method at its own learning rate"): 82.5 at 3e-3, 81.7 at 1e-3, the
        majority class at 1e-2."""
        return 3e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout != 0:
            raise ValueError(
                f"DeltaLoRA.dropout must be 0, got {self.dropout}: W moves by the change of s·B A, "
                "which dropout on the branch's input would make noisy (the paper removes it); use "
                "LoRA for dropout"
            )

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> DeltaLoRALayer:
        kind, in_features, out_features = linear_like(base, path, "DeltaLoRA", self.layer_types)
        layer = DeltaLoRALayer(self, kind, in_features, out_features, adapter_dtype(base), base)
        KaimingUniform().initialise(layer.lora_A.data, layer.lora_B.data, kind=kind, generator=generator)
        if self.warmup_steps == 0:
            layer.take_snapshot()  # W moves from the first step: (A_0, B_0 = 0)
        return layer

    def parameter_count(self, base: nn.Module) -> int:
        return self.factor_count(base)

    def stored_bytes(self, base: nn.Module) -> int:
        return 2 * self.parameter_count(base) * adapter_dtype(base).itemsize + 1

    # -- the training-process hooks (deltatune.runtime.stepping) -----------------------------------------
    def for_steps(self, total: int, given: Collection[str]) -> DeltaLoRA:
        """Itself; refuses a warm-up as long as the run (W would never move)."""
        if self.warmup_steps >= total:
            raise ValueError(
                f"DeltaLoRA.warmup_steps must be < the run's {total} optimizer steps (else W never "
                f"moves: plain LoRA), got {self.warmup_steps}; e.g. warmup_steps={total // 10}"
            )
        return self

    def on_step(self, attachment: AdapterView, name: str, step: int, optimizer: Any) -> None:
        """At step K (or the first step after it that a loop reports), snapshot (A_K, B_K)."""
        for layer in layers_of(attachment, name, DeltaLoRALayer).values():
            if not layer.started and step >= layer.warmup_steps:
                layer.take_snapshot()


class DeltaLoRALayer(LoRALayer):
    """A LoRA layer plus the snapshot (A_K, B_K) that the telescoped W update subtracts."""

    def __init__(
        self,
        config: DeltaLoRA,
        kind: str,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        base: nn.Module | None,
    ) -> None:
        super().__init__(lora_of(config), kind, in_features, out_features, dtype, base)
        self.lam = config.lam
        self.warmup_steps = config.warmup_steps
        # Empty until step K (so the forward pass asks no device for a flag); then (r, in), (out, r).
        # Persistent: the checkpoint's step state.
        self.snapshot_A: torch.Tensor
        self.snapshot_B: torch.Tensor
        self.register_buffer("snapshot_A", torch.zeros(0, in_features, dtype=dtype))
        self.register_buffer("snapshot_B", torch.zeros(out_features, 0, dtype=dtype))

    @property
    def started(self) -> bool:
        """Whether W has started moving (the snapshot is taken)."""
        return self.snapshot_A.shape[0] > 0

    def take_snapshot(self) -> None:
        """Keep the current (A, B) as (A_K, B_K)."""
        self.snapshot_A = self.lora_A.detach().clone()
        self.snapshot_B = self.lora_B.detach().clone()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with ``s · B A`` = ``s · B A + λ s (sg(B) sg(A) − B_K A_K)`` (rank 3r once started)."""
        if not self.started:
            return self.lora_A, self.lora_B
        A, B = self.lora_A, self.lora_B
        return (
            torch.cat([A, A.detach(), self.snapshot_A]),
            torch.cat([B, self.lam * B.detach(), -self.lam * self.snapshot_B], dim=1),
        )

    def export_state(self) -> dict[str, torch.Tensor]:
        """A, B, the snapshot (zeros before step K) and whether it is taken: one size at any step."""
        started = self.started
        return {
            "lora_A": self.lora_A.detach(),
            "lora_B": self.lora_B.detach(),
            "snapshot_A": self.snapshot_A if started else torch.zeros_like(self.lora_A),
            "snapshot_B": self.snapshot_B if started else torch.zeros_like(self.lora_B),
            "started": torch.tensor(started, dtype=torch.uint8, device=self.lora_A.device),
        }

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_state`."""
        like = self.lora_A
        with torch.no_grad():
            self.lora_A.copy_(state["lora_A"])
            self.lora_B.copy_(state["lora_B"])
        if int(state["started"]):
            self.snapshot_A = state["snapshot_A"].to(like).clone()
            self.snapshot_B = state["snapshot_B"].to(like).clone()
        else:
            self.snapshot_A = like.new_zeros(0, like.shape[1])
            self.snapshot_B = like.new_zeros(self.lora_B.shape[0], 0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam:g}, started={self.started}"
