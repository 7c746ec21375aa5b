"""Initialising LoRA from the weight itself: PiSSA, MiLoRA and CorDA.

* **PiSSA** -- Principal Singular values and Singular vectors Adaptation (Meng, Wang, Zhang; NeurIPS
  2024), arXiv:2404.02948. With ``W = U S Vᵀ`` and the adapter's scale ``s``:

      B = U_r √(S_r / s),   A = √(S_r / s) V_rᵀ,   W_res = W − s·B A   (frozen)

  so the model is unchanged at init and training moves the principal subspace.
* **MiLoRA** -- Minor singular component LoRA (Wang et al. 2024), arXiv:2406.09044: the same with the
  r *smallest* singular components.
* **CorDA** -- Context-oriented Decomposition Adaptation (Yang et al.; NeurIPS 2024), arXiv:2406.05223:
  decompose ``W C = U S Vᵀ`` with C the covariance of the layer's inputs on calibration data, so that
  ``W = U S (Vᵀ C⁻¹)``; the instruction-previewed mode ("ipm") puts the r principal components in the
  adapter, the knowledge-preserved mode ("kpm") the r minor ones (and freezes the principal ones).

How the residual is frozen here: the base weight is **not** modified. The LoRA layer keeps the
initial factors ``(A0, B0)`` as frozen buffers and computes ``s·(B A − B0 A0) x``, as one rank-2r
product ``s·[B | −B0] [A ; A0] x``. The function is PiSSA's (``W_res + s·B A``), but ``disabled()`` and
``unload()`` give the original weight back bit for bit, nothing full-size is copied, tied weights stay
tied, and the adapter saves as a plain rank-2r LoRA on the original weight that loads onto an
unmodified base (in deltatune and in PEFT). See :class:`deltatune.LoRA`'s ``save_mode``.

Randomized SVD (Halko, Martinsson, Tropp 2011, arXiv:0909.4061) runs with the layer's own seeded
generator, so the same config and seed always give the same init (PEFT's ``pissa_niter_N`` draws from
the global RNG and differs between reloads).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deltatune import LoRA, PiSSA, inject, unload
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> x = torch.randn(2, 16)
    >>> before = net(x)
    >>> att = inject(net, LoRA(rank=4, init=PiSSA()), targets=["0"])
    >>> torch.allclose(net(x), before, atol=1e-5)
    True
    >>> torch.equal(unload(net)(x), before)
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...contract.fields import Float, Int, OneOf, Text, component, param, validate
from ...targets import module_kind, shape_of
from .base import LoRAInit


def randomized_svd(
    weight: torch.Tensor, rank: int, *, niter: int, oversample: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of ``weight`` by randomized range finding.

    Returns ``(U, S, Vh)`` with shapes ``(m, rank)``, ``(rank,)``, ``(rank, n)``. ``niter`` power
    iterations (each re-orthonormalised) sharpen the spectrum; ``oversample`` extra columns make the
    range estimate robust. Uses only ``generator``, never the global RNG.
    """
    m, n = weight.shape
    k = min(rank + oversample, m, n)
    sketch = torch.randn(n, k, generator=generator, dtype=weight.dtype).to(weight.device)
    Q, _ = torch.linalg.qr(weight @ sketch)  # (m, k): an orthonormal basis of W's range
    for _ in range(niter):
        Z, _ = torch.linalg.qr(weight.t() @ Q)
        Q, _ = torch.linalg.qr(weight @ Z)
    small = Q.t() @ weight  # (k, n)
    Ub, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


def split_components(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of chosen singular components: A = √(S/s) Vh, B = U √(S/s), so s·B A = U diag(S) Vh."""
    root = (S / scale).sqrt()
    return root[:, None] * Vh, U * root[None, :]


class WeightInit(LoRAInit):
    """An initialiser that takes the adapter's factors out of the base weight (PiSSA family)."""

    random: ClassVar[bool] = False  # deterministic given the weight (PiSSA's randomized SVD: True)

    def from_weight(
        self, weight: torch.Tensor, rank: int, scale: float, *, generator: torch.Generator, path: str
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        """``weight``: (out, in) float32. Returns A (rank, in) and B (out, rank)."""
        raise TypeError(f"{type(self).__name__} must implement from_weight()")

    def initialise(self, A: torch.Tensor, B: torch.Tensor, *, kind: str, generator: torch.Generator) -> None:
        raise ValueError(
            f"{type(self).__name__} initialises from the base weight: use it inside LoRA(init=...)"
        )


@component("pissa")
@dataclass(frozen=True)
class PiSSA(WeightInit):
    """The r principal singular components go to the adapter; the rest stays frozen.

    Fields:
        svd: "full" (``torch.linalg.svd``, exact) or "randomized" (fast; seeded per module) ["full"].
        niter: power iterations of the randomized SVD [4; the paper's fast variant uses 4 to 16].
        oversample: extra sketch columns of the randomized SVD [8].
    """

    svd: str = param("full", OneOf(("full", "randomized")), "how to compute the SVD")
    niter: int = param(4, Int(min=0), "power iterations of the randomized SVD")
    oversample: int = param(8, Int(min=0), "extra sketch columns of the randomized SVD")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def random(self) -> bool:  # type: ignore[override]
        return self.svd == "randomized"

    def from_weight(
        self, weight: torch.Tensor, rank: int, scale: float, *, generator: torch.Generator, path: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.svd == "randomized":
            U, S, Vh = randomized_svd(
                weight, rank, niter=self.niter, oversample=self.oversample, generator=generator
            )
        else:
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
        return split_components(U, S, Vh, scale)


@component("milora")
@dataclass(frozen=True)
class MiLoRA(WeightInit):
    """The r minor singular components go to the adapter (full SVD: a randomized one finds the top)."""

    def from_weight(
        self, weight: torch.Tensor, rank: int, scale: float, *, generator: torch.Generator, path: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        return split_components(U[:, -rank:], S[-rank:], Vh[-rank:], scale)


@component("corda")
@dataclass(frozen=True)
class CorDA(WeightInit):
    """Components of ``W C`` (C: input covariance from calibration data, see :func:`collect_covariance`).

    Fields:
        covariance: a safetensors file written by :func:`collect_covariance` (one (in, in) matrix per
            adapted module, keyed by module path) [required].
        mode: "ipm" (instruction-previewed: principal components train) or "kpm" (knowledge-preserved:
            minor components train, principal ones stay frozen) ["ipm"].
        damping: added to C's diagonal, relative to its mean, so that C is invertible [1e-6].
    """

    covariance: str = param(
        "", Text(), "safetensors file of input covariances from deltatune.collect_covariance()"
    )
    mode: str = param("ipm", OneOf(("ipm", "kpm")), "which components the adapter takes")
    damping: float = param(1e-6, Float(0.0), "relative diagonal damping of the covariance")

    def __post_init__(self) -> None:
        if self.covariance == "":
            raise ValueError(
                "CorDA.covariance must name a file of input covariances: collect them first with "
                "deltatune.collect_covariance(model, batches, targets, path=...) on calibration data"
            )
        validate(self)

    def from_weight(
        self, weight: torch.Tensor, rank: int, scale: float, *, generator: torch.Generator, path: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        C = _read_covariance(self.covariance, path).to(device=weight.device, dtype=torch.float64)
        if C.shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(
                f"CorDA: the covariance of {path!r} is {tuple(C.shape)}, but the module has "
                f"in_features={weight.shape[1]}"
            )
        C = C + self.damping * C.diagonal().mean().clamp_min(1e-12) * torch.eye(
            C.shape[0], dtype=C.dtype, device=C.device
        )
        W = weight.double()
        U, S, Vh = torch.linalg.svd(W @ C, full_matrices=False)
        Vh_inv = torch.linalg.solve(C, Vh.t()).t()  # Vh C⁻¹ (C is symmetric)
        keep = slice(0, rank) if self.mode == "ipm" else slice(-rank, None)
        A, B = split_components(U[:, keep], S[keep], Vh_inv[keep], scale)
        return A.float(), B.float()


def _read_covariance(path: str, module: str) -> torch.Tensor:
    """The covariance of ``module``, read from the file each time (only that tensor): no cache, so
    a rewritten file is never answered from an old copy (a modification time can stay the same)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(
            f"CorDA.covariance: no file {path!r}; write it with deltatune.collect_covariance(..., path=...)"
        )
    with safe_open(path, framework="pt") as f:
        keys = sorted(f.keys())
        if module not in keys:
            raise ValueError(
                f"CorDA: {path!r} has no covariance for {module!r} (it has {keys[:4]}...); "
                "collect it for the same targets"
            )
        out: torch.Tensor = f.get_tensor(module)
    return out


def collect_covariance(
    model: nn.Module,
    batches: Iterable[Any],
    targets: Iterable[str],
    *,
    path: str | os.PathLike[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Input covariances ``C = mean_tokens(x xᵀ)`` of the target modules over calibration batches.

    Args:
        model: the model (not yet adapted by these modules).
        batches: each a dict of tensors (``model(**batch)``) or a tensor (``model(batch)``).
        targets: module paths (exact names, as :func:`deltatune.inject` resolves them).
        path: also write them to this safetensors file (what ``CorDA(covariance=...)`` reads).

    Returns:
        path -> (in, in) float32 covariance.

    Raises:
        ValueError: no batches, a batch that is not a tensor / dict of tensors, an unknown target,
            a module that is not linear, or an input whose last dimension is not the module's
            ``in_features``.
    """
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    wanted = list(targets)
    for name in wanted:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"collect_covariance: the model has no module {name!r}")
        if module_kind(module) not in ("linear", "conv1d"):
            raise ValueError(f"collect_covariance: {name!r} is {type(module).__name__}, not a linear layer")
        in_features = shape_of(module)[0]

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name, width: int = in_features) -> None:
            x = args[0]
            if not isinstance(x, torch.Tensor) or x.shape[-1] != width:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"collect_covariance: {name!r} expects inputs (..., {width}), got {shape}; "
                    "check that the calibration batches are what the model takes"
                )
            flat = x.detach().reshape(-1, width).double()
            sums[name] = sums.get(name, 0) + flat.t() @ flat  # type: ignore[assignment, operator]
            counts[name] = counts.get(name, 0) + flat.shape[0]

        handles.append(module.register_forward_pre_hook(hook))
    seen = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if isinstance(batch, Mapping) and all(isinstance(v, torch.Tensor) for v in batch.values()):
                    model(**batch)
                elif isinstance(batch, torch.Tensor) and batch.dim() >= 1:
                    model(batch)
                else:
                    raise ValueError(
                        f"collect_covariance: batch {i} is {type(batch).__name__}; give dicts of tensors "
                        "(model(**batch)) or tensors (model(batch))"
                    )
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError("collect_covariance: no calibration batches were given")
    missing = [n for n in wanted if n not in sums]
    if missing:
        raise ValueError(f"collect_covariance: the batches never reached {missing[:4]}")
    out = {n: (sums[n] / counts[n]).float().contiguous() for n in wanted}
    if path is not None:
        from safetensors.torch import save_file

        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        save_file(out, str(tmp), metadata={"tokens": str(min(counts.values()))})
        os.replace(tmp, target)
    return out
