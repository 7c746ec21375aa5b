"""Adapter arithmetic: several adapters combined into one, on each method's exact update.

Every combination is defined on the update each adapter makes to each module's weight, ``ΔW_i``,
read exactly (:mod:`deltatune.runtime.deltas`): ``scale · B A`` for every low-rank method (rsLoRA's
``alpha/√r``, VeRA's scaling vectors, VB-LoRA's composed vectors, AdaLoRA's kept triplets, PiSSA's
difference from the original weight, mixed ranks), ``merged − base`` for the others (DoRA: its
magnitude and direction together, as the method's own update). With weights ``w_i``:

* ``cat`` and ``linear``: task arithmetic (Ilharco et al. 2023), ``ΔW = Σ w_i ΔW_i``, exactly:
  stored as the factors side by side (ranks add; negative weights subtract an adapter); a dense
  update (DoRA) makes the result dense. (PEFT's ``linear`` sums the factors themselves, which is
  not ``Σ w_i ΔW_i``; here both names mean the exact sum.)
* ``svd``: the best rank-``rank`` approximation of ``Σ w_i ΔW_i`` (or the rank that keeps
  ``energy`` of its squared singular values).
* ``magnitude_prune``: each ``ΔW_i`` keeps its ``density`` largest entries, then ``Σ w_i ΔW_i``.
* ``ties``: TIES-Merging (Yadav et al. 2023, arXiv:2306.01708): trim each ``ΔW_i`` to its
  ``density`` largest entries, elect each entry's sign (``majority_sign="total"``: the sign of the
  sum; ``"frequency"``: of the count), and average the weighted entries that agree with it.
* ``dare_linear`` / ``dare_ties``: DARE (Yu et al. 2024, arXiv:2311.03099): drop each entry with
  probability ``1 − density`` and rescale the rest by ``1/density`` (seeded), then sum, or elect
  and average as TIES does.

These follow PEFT's ``add_weighted_adapter`` formulas (its ``*_svd`` forms work on the full update
too), so the same adapters, weights and density give PEFT's outputs where PEFT is right; unlike
PEFT, the update is the method's own, so DoRA and mixed ranks combine correctly (rsLoRA too, which
PEFT before 0.22 scaled by √r), and negative weights work. A pruned or elected result is not
low-rank: it is stored as the best rank-``rank`` LoRA (default: the largest rank among the inputs;
``rank="full"``: exact, a full-rank LoRA). The result is a new, frozen LoRA adapter (``dt.save``,
``dt.export_lora``, ``deltatune eval``/``chat`` read it like any other); an adapter that does not
adapt a module contributes no update there when ``missing="zero"`` (as PEFT does), and different
targets are refused otherwise.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> net = nn.Sequential(nn.Linear(8, 8))
    >>> att = dt.inject(net, dt.LoRA(rank=2), targets=["0"], name="a", seed=1)
    >>> _ = dt.inject(net, dt.LoRA(rank=2), targets=["0"], name="b", seed=2)
    >>> for name in ("a", "b"):
    ...     _ = torch.nn.init.normal_(att.layers(name)["0"].lora_B)  # (as if trained)
    >>> att = dt.combine(net, {"a": 0.5, "b": 0.5}, name="mean")
    >>> att.info("mean").method.rank  # the factors concatenate: exact, rank 2 + 2
    4
    >>> att = dt.combine(net, {"a": 1.0, "b": 1.0}, name="ties", how="ties", density=0.5, rank=2)
    >>> att.info("ties").method.rank
    2
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from .methods.lowrank.lora import LoRA, LoRALayer
from .runtime.compose import attach_combined
from .runtime.deltas import Factors, compact, module_updates, truncate
from .runtime.wrapper import Attachment, attachment_of

__all__ = ["HOW", "combine", "combined_update"]

#: The combination types, as :func:`combine`'s ``how``.
HOW = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")

Update = Factors | torch.Tensor


def _dense(update: Update) -> torch.Tensor:
    return update.product() if isinstance(update, Factors) else update.double()


def _norm(update: Update) -> float:
    """The Frobenius norm, without forming a low-rank update's dense product."""
    return update.norm() if isinstance(update, Factors) else float(update.double().norm())


def _finite(update: Update) -> bool:
    return update.finite() if isinstance(update, Factors) else bool(update.isfinite().all())


def _magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``density`` largest-magnitude entries set to zero (PEFT's rule:
    ``int(density · numel)`` entries kept)."""
    if density >= 1:
        return t
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def _random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` and rescaled by ``1/density``."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full(t.shape, density, dtype=t.dtype), generator=generator)
    return t * mask.to(t.device) / density


def _elect(stacked: torch.Tensor, weights: torch.Tensor, how: str) -> torch.Tensor:
    """TIES' sign election and disjoint mean (on the unweighted trimmed updates, as PEFT elects)."""
    sign = stacked.sign()
    magnitude = stacked.sum(0) if how == "total" else sign.sum(0)
    majority = torch.where(magnitude >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (sign == majority).to(stacked.dtype)
    weighted = stacked * weights.reshape(-1, *([1] * (stacked.dim() - 1)))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def combined_update(
    updates: list[Update],
    weights: list[float],
    how: str,
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
) -> Update:
    """One module's combined update: exact factors for ``cat``/``linear`` of low-rank updates,
    else the dense (out, in) result of the combination (float64)."""
    if how in ("cat", "linear") and all(isinstance(u, Factors) for u in updates):
        parts = [u for u in updates if isinstance(u, Factors)]
        A = torch.cat([p.A.double() for p in parts])
        B = torch.cat([p.B.double() * (w * p.scale) for p, w in zip(parts, weights, strict=True)], dim=1)
        return compact(Factors(A, B, 1.0, parts[0].kind))
    dense = [_dense(u) for u in updates]
    w = torch.tensor(weights, dtype=torch.float64, device=dense[0].device)
    if how in ("cat", "linear", "svd"):
        return sum((wi * d for wi, d in zip(weights, dense, strict=True)), torch.zeros_like(dense[0]))
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if how in ("magnitude_prune", "ties"):
        trimmed = torch.stack([_magnitude(d, density) for d in dense])
    else:  # dare_linear, dare_ties
        trimmed = torch.stack([_random(d, density, g) for d in dense])
    if how in ("magnitude_prune", "dare_linear"):
        return (trimmed * w.reshape(-1, *([1] * (trimmed.dim() - 1)))).sum(0)
    return _elect(trimmed, w, majority_sign)


def _check(
    weights: Mapping[str, float],
    how: str,
    density: float | None,
    rank: int | str | None,
    energy: float | None,
) -> None:
    if not weights:
        raise ValueError("combine: weights must name at least one adapter")
    bad: dict[str, object] = {
        n: w for n, w in weights.items() if not isinstance(w, (int, float)) or isinstance(w, bool)
    }
    bad.update({n: w for n, w in weights.items() if n not in bad and not math.isfinite(w)})
    if bad:
        raise ValueError(f"combine: weights must be finite numbers, got {bad}")
    if how not in HOW:
        raise ValueError(f"combine: how must be one of {', '.join(HOW)}, not {how!r}")
    if how in _PRUNING and density is None:
        raise ValueError(f"combine: how={how!r} needs density= (the fraction of entries kept, in (0, 1])")
    if density is not None and (how not in _PRUNING or not 0 < density <= 1):
        raise ValueError(
            f"combine: density={density} "
            + ("must be in (0, 1]" if how in _PRUNING else f"does not apply to {how!r}")
        )
    if (
        rank is not None
        and rank != "full"
        and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1)
    ):
        raise ValueError(f"combine: rank must be a positive integer or 'full', not {rank!r}")
    if energy is not None and (how != "svd" or not 0 < energy <= 1 or rank is not None):
        raise ValueError("combine: energy= (in (0, 1]) applies to how='svd' without rank=")


def _rank(u: Update) -> int:
    return u.rank if isinstance(u, Factors) else min(u.shape)


def _cancelled(combined: Update, parts: list[Update], weights: list[float], kind: str) -> Update:
    """Zero factors (rank 1) where the combination cancels to rounding (an adapter minus itself), so
    that the model's output is the base's exactly; else ``combined``."""
    size = sum(_norm(u) * abs(w) for u, w in zip(parts, weights, strict=True))
    if _norm(combined) > 1e-12 * size:
        return combined
    out_features, in_features = (
        (combined.B.shape[0], combined.A.shape[1]) if isinstance(combined, Factors) else combined.shape
    )
    return Factors(torch.zeros(1, in_features), torch.zeros(out_features, 1), 1.0, kind)


def _stored(update: Update, rank: int | str | None, energy: float | None, inputs: int, kind: str) -> Factors:
    """The combined update as the LoRA factors the new adapter stores."""
    if isinstance(update, Factors):
        return update
    if rank == "full":
        full = min(update.shape)
        return truncate(update, full, kind)[0]
    if energy is not None:
        s = torch.linalg.svdvals(update)
        kept = torch.cumsum(s**2, 0) / (s**2).sum().clamp(min=torch.finfo(s.dtype).tiny)
        r = int((kept < energy - 1e-12).sum()) + 1
        return truncate(update, r, kind)[0]
    return truncate(update, int(rank) if rank is not None else inputs, kind)[0]


def combine(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    *,
    how: Literal["cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"] = "cat",
    density: float | None = None,
    rank: int | Literal["full"] | None = None,
    energy: float | None = None,
    majority_sign: Literal["total", "frequency"] = "total",
    seed: int = 0,
    missing: Literal["zero", "refuse"] | None = None,
    keep_modules_of: str | None = None,
) -> Attachment:
    """Add adapter ``name``: the adapters of ``weights`` combined by ``how`` (see the module
    docstring), a frozen LoRA.

    Args:
        weights: adapter name -> weight (negative subtracts).
        density: the fraction of entries kept (``ties``, ``dare_*``, ``magnitude_prune``).
        rank: the stored rank of a result that is not exactly low-rank (``svd`` and the pruning
            types; default: the largest rank among the inputs), or ``"full"`` (exact).
        energy: for ``svd``: the smallest rank keeping this fraction of the squared singular values.
        majority_sign: TIES' sign election: ``"total"`` (sign of the sum) or ``"frequency"``.
        seed: DARE's random drops.
        missing: where an adapter does not adapt a module: ``"zero"`` (it contributes nothing
            there), ``"refuse"``; None refuses when the adapters' targets differ.
        keep_modules_of: the adapter whose full module copies (``modules_to_save``: a task's
            classifier head) the result keeps; the others' copies are left out. Without it,
            adapters with module copies are refused (copies of different tasks cannot be averaged).

    Raises:
        ValueError: naming what to change: an unknown adapter, a bad weight, density or rank,
            adapters on other modules without a ``missing`` rule, full module copies
            (``modules_to_save``), an adapter that is no weight update (prompts, bottleneck adapters,
            AM-LoRA's mixture), or a name in use. Nothing is added then.
    """
    _check(weights, how, density, rank, energy)
    att = attachment_of(model)
    if name in att.adapters:
        raise ValueError(f"adapter {name!r} already exists on this model")
    updates = _read_updates(model, weights, missing, keep_modules_of)
    paths = [p for p in att.wrappers if any(p in u for u in updates.values())]
    generator = torch.Generator().manual_seed(seed)
    inputs = max(_rank(u) for per_module in updates.values() for u in per_module.values())
    factors: dict[str, Factors] = {}
    like: dict[str, torch.Tensor] = {}  # path -> a tensor of the adapters' dtype and device
    for path in paths:
        present = [n for n in weights if path in updates[n]]
        parts = [updates[n][path] for n in present]
        like[path] = parts[0].A if isinstance(parts[0], Factors) else parts[0]
        kind = str(getattr(att.wrappers[path].adapters[present[0]], "kind", "linear"))
        part_weights = [float(weights[n]) for n in present]
        combined = combined_update(
            parts,
            part_weights,
            how,
            density=density if density is not None else 1.0,
            majority_sign=majority_sign,
            generator=generator,
        )
        exact = "full" if how in ("cat", "linear") and rank is None else rank  # (a dense sum stays exact)
        factors[path] = _stored(_cancelled(combined, parts, part_weights, kind), exact, energy, inputs, kind)
    layers = {p: _lora_layer(att.wrappers[p].base, f, like[p]) for p, f in factors.items()}
    configs = {p: layer.config for p, layer in layers.items()}
    seed_of = att.info(next(iter(weights))).seed
    return attach_combined(model, name, configs, layers, seed=seed_of, copies_of=keep_modules_of)


def _read_updates(
    model: nn.Module, weights: Mapping[str, float], missing: str | None, keep_modules_of: str | None
) -> dict[str, dict[str, Update]]:
    """adapter -> path -> its exact update, after refusing what cannot be combined (module copies
    without ``keep_modules_of``, non-finite values, other modules without a ``missing`` rule)."""
    att = attachment_of(model)
    infos = [att.info(n) for n in weights]
    saved = [i.name for i in infos if i.modules_to_save]
    if keep_modules_of is not None and keep_modules_of not in weights:
        raise ValueError(f"combine: keep_modules_of={keep_modules_of!r} is not one of the adapters combined")
    if saved and keep_modules_of is None:
        copies = ", ".join(att.info(saved[0]).modules_to_save)
        raise ValueError(
            f"combine: {saved[0]!r} saves whole modules (modules_to_save: {copies}), "
            "whose copies cannot be combined; pass keep_modules_of=NAME (--keep-modules-of) to keep one "
            "adapter's copies (a task's own head)"
        )
    updates = {i.name: module_updates(model, i.name, "combine") for i in infos}
    for n, per_module in updates.items():
        broken = next((p for p, u in per_module.items() if not _finite(u)), None)
        if broken is not None:
            raise ValueError(f"combine: adapter {n!r} holds non-finite values at {broken!r}; fix or drop it")
    paths = {p for u in updates.values() for p in u}
    uneven = [p for p in att.wrappers if p in paths and not all(p in u for u in updates.values())]
    if uneven and missing != "zero":
        lacking = next(n for n, u in updates.items() if uneven[0] not in u)
        raise ValueError(
            f"combine: {lacking!r} does not adapt {uneven[0]!r} ({len(uneven)} such modules); pass "
            "missing='zero' (--missing zero) to let an adapter add nothing where it has no update"
        )
    return updates


def _lora_layer(base: nn.Module, f: Factors, like: torch.Tensor) -> LoRALayer:
    """A LoRA layer holding ``f`` (scale 1: ``alpha == rank``) in the dtype and on the device of the
    adapters it combines (``like``)."""
    config = LoRA(rank=f.rank, alpha=float(f.rank))
    layer = LoRALayer(config, f.kind, int(f.A.shape[1]), int(f.B.shape[0]), like.dtype, base).to(like.device)
    with torch.no_grad():
        layer.lora_A.copy_(f.A)
        layer.lora_B.copy_(f.B * f.scale)
    return layer
