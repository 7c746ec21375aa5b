"""Each adapter's exact update of each module it adapts, as low-rank factors or a dense matrix.

The exports (:mod:`deltatune.formats.lora`, :mod:`deltatune.formats.gguf`) and adapter arithmetic
(:mod:`deltatune.arithmetic`) read adapters through here: a layer that is low-rank says so through
the contract (:meth:`~deltatune.contract.Layer.lora_form`, exactly), any other weight update is
read off what merging would write (``merged − base``: DoRA's magnitudes included), in PEFT's (out,
in) orientation. :func:`compact` keeps factors as small as they exactly are; :func:`truncate` is the
best rank-r approximation of a dense update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..contract.layer import ExpertsLayer, as_layer, in_weight_layout
from .quant import NF4Linear
from .wrapper import attachment_of

__all__ = ["Factors", "compact", "module_updates", "truncate", "weight_change"]


@dataclass(frozen=True)
class Factors:
    """One module's update as ``scale · B A`` in PEFT's orientation: ``A`` (r, in), ``B`` (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    kind: str  # "linear", "conv1d", "embedding"

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def norm(self) -> float:
        """``‖scale · B A‖_F`` from the two r × r Gram matrices, without forming the (out, in) product."""
        A, B = self.A.double(), self.B.double()
        squared = float(((B.T @ B) * (A @ A.T)).sum().clamp(min=0.0))
        return abs(self.scale) * math.sqrt(squared)

    def finite(self) -> bool:
        return bool(self.A.isfinite().all()) and bool(self.B.isfinite().all())

    def product(self) -> torch.Tensor:
        """``scale · B A`` as an (out, in) float64 matrix."""
        return (self.B.double() @ self.A.double()) * self.scale


def compact(f: Factors, rtol: float = 1e-10) -> Factors:
    """The same update with as few columns as it exactly has: directions that are linear
    combinations of the others (singular value below ``rtol`` times the largest, in float64: Delta-
    LoRA's repeated A, a PiSSA adapter before training) are dropped. The factors are returned
    unchanged when no direction can go, or when the update is zero (an untrained LoRA keeps its
    rank), so a plain LoRA stays bit for bit the LoRA it was."""
    A, B = f.A.double(), f.B.double()
    if f.rank == 0:
        return f
    qa, ra = torch.linalg.qr(A.T)  # A = ra.T qa.T
    qb, rb = torch.linalg.qr(B)  # B = qb rb
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    keep = int((s > rtol * s[0]).sum())
    if keep == f.rank or keep == 0:
        return f
    root = s[:keep].sqrt()
    B2 = qb @ (u[:, :keep] * root)
    A2 = (root[:, None] * vh[:keep]) @ qa.T
    return Factors(A2.to(f.A.dtype), B2.to(f.B.dtype), f.scale, f.kind)


def truncate(delta: torch.Tensor, rank: int, kind: str) -> tuple[Factors, float]:
    """The best rank-``rank`` LoRA (Eckart-Young: the truncated SVD) of an (out, in) update, and
    its relative Frobenius error."""
    d = delta.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, int(s.shape[0]))
    root = s[:k].sqrt()
    B = u[:, :k] * root
    A = root[:, None] * vh[:k]
    norm = float(torch.linalg.matrix_norm(d))
    error = float(torch.linalg.matrix_norm(d - B @ A)) / norm if norm > 0 else 0.0
    return Factors(A.to(delta.dtype), B.to(delta.dtype), 1.0, kind), error


def weight_change(layer: nn.Module, base: nn.Module, path: str, what: str) -> torch.Tensor | None:
    """The layer's update of ``base``'s weight in PEFT's (out, in) orientation; None if it makes none.

    Raises:
        ValueError: merging the layer changes other tensors of the module too (BitFit's bias, SAID's
            bias rows): weight arithmetic and a LoRA hold a weight change only, and would lose them.
    """
    own = as_layer(layer)
    kind = getattr(layer, "kind", "linear")
    plain = base.dequantize() if getattr(base, "quantized", False) else base  # type: ignore[operator]
    merged = own.merged(plain)
    if merged is None:  # merge writes delta_weight into the weight, and nothing else
        delta = own.delta_weight()
        return None if delta is None else in_weight_layout(delta.detach(), kind)
    old, new = plain.state_dict(), merged.state_dict()
    others = [k for k, t in new.items() if k != "weight" and not torch.equal(t, old.get(k, t))]
    if others:
        raise ValueError(
            f"{what}: {type(layer).__name__} at {path!r} changes the module's {', '.join(others)}, not "
            "only its weight, which weight arithmetic and a LoRA cannot hold; export the merged model "
            "(--to merged) or serve the adapter with deltatune"
        )
    after, before = new.get("weight"), old.get("weight")
    if not isinstance(after, torch.Tensor) or not isinstance(before, torch.Tensor):
        return None
    return in_weight_layout((after.float() - before.float()).detach(), kind)  # (its own inverse)


def check_not_residual(base: nn.Module, path: str, method: str, what: str) -> None:
    if isinstance(base, NF4Linear) and base.settings.iterations is not None:
        raise ValueError(
            f"{what}: {method} at {path!r} sits on a QPiSSA residual (the 4-bit W - s·B0 A0): the "
            "adapter is relative to that quantised residual, not to the original weight, so no LoRA "
            "on the original model reproduces it; export the merged model (--to merged or gguf-merged)"
        )


def module_updates(model: nn.Module, adapter: str, what: str) -> dict[str, Factors | torch.Tensor]:
    """path -> the adapter's exact update of that module: :class:`Factors` where the layer is a
    plain LoRA (compacted), else the dense (out, in) weight change.

    Raises:
        ValueError: a module whose update is no weight change (prompts, adapters, input-dependent
            mixtures), or an update relative to a QPiSSA residual, naming the module and the method.
    """
    att = attachment_of(model)
    info = att.info(adapter)
    method = type(info.method).__name__
    out: dict[str, Factors | torch.Tensor] = {}
    for path, layer in att.adapter_layers(adapter).items():
        base = att.wrappers[path].base
        check_not_residual(base, path, method, what)
        if isinstance(layer, ExpertsLayer):
            raise ValueError(
                f"{what}: {method} at {path!r} changes the 3-D weights of fused MoE experts, which "
                "weight arithmetic and plain-LoRA files do not hold yet; save it (deltatune.save, or "
                "deltatune.export_peft: PEFT's target_parameters) or export the merged model "
                "(--to merged)"
            )
        form = as_layer(layer).lora_form()
        kind = str(getattr(layer, "kind", "linear"))
        if form is not None:
            A, B, scale = form
            out[path] = compact(Factors(A, B, float(scale), kind))
            continue
        delta = weight_change(layer, base, path, what)
        if delta is None:
            raise ValueError(
                f"{what}: {method} at {path!r} is not a change of the module's weight "
                f"({type(layer).__name__}): no weight arithmetic or LoRA can hold it; serve the "
                "adapter with deltatune (save/load) or, where the method merges, export the merged "
                "model (--to merged)"
            )
        out[path] = delta
    if not out:
        raise ValueError(f"{what}: adapter {adapter!r} ({method}) updates no module")
    return out
