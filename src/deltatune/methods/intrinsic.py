"""Intrinsic-dimension fine-tuning (DID and SAID) with the Fastfood transform.

Aghajanyan, Zettlemoyer, Gupta, "Intrinsic Dimensionality Explains the Effectiveness of Language
Model Fine-Tuning" (ACL 2021), arXiv:2012.13255, building on Li, Farkhoor, Liu, Yosinski,
"Measuring the Intrinsic Dimension of Objective Landscapes" (ICLR 2018), arXiv:1804.08838:

    DID:   θ   = θ0   + P θ_d                     θ_d ∈ R^d, zero at init
    SAID:  θ_i = θ0_i + λ_i P(θ_{d−m})_i          λ ∈ R^m, one scalar per adapted module, one at init

For SAID the m scalars are counted in d (the paper's θ^{d−m}): both structures train exactly d
values, so d means the same thing on the x-axis of a d90 curve.

P is the Fastfood transform (Le, Sarlós, Smola 2013), never stored as a D×d matrix. The D
adapted values (each module's weight, then its bias when ``bias=True``) are cut, module by module,
into blocks of L = 2^⌈log2 d_θ⌉ rows; block j is

    V_j = s_j · H G_j Π_j H B_j        (on θ zero-padded to L)

with H the L×L Walsh–Hadamard matrix (applied in O(L log L)), B_j a random ±1 diagonal, Π_j a
random permutation, G_j a random N(0, 1) diagonal and s_j = 1/sqrt(D·ΣG_j²). Each block then
has columns of norm exactly sqrt(L/D), so the stacked P has unit-norm columns up to the last,
partly used block of each module: E‖Pθ‖² ≈ ‖θ‖². The cost is O(D log d) per forward pass; B, Π
and G are regenerated from the adapter's seed (per module path) and never saved: an adapter file
holds d float32 values, and the seed is in its config.

By linearity λ_i P(θ)_i = P(λ_i θ)_i: SAID scales the d−m-vector before projecting (free).
The update is linear in weight space, so adapters merge: W ← W + ΔW (and b ← b + Δb).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deltatune import IntrinsicDimension, inject
    >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> att = inject(net, IntrinsicDimension(d=20), targets=["0", "2"])
    >>> att.closed_form("default")  # 18 values of θ + 2 λ (SAID); 4 bytes each
    (20, 80)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._cache import Memo
from ..contract import AdapterView, Method, ReplacingLayer, Suite, merged_linear, register
from ..contract.fields import Bool, Float, Int, OneOf, param
from ..kernels.lowrank import compute_dtype
from ..targets import module_kind

# ----------------------------------------------------------------------------------------------
# Walsh–Hadamard and Fastfood
# ----------------------------------------------------------------------------------------------


def _check_power_of_two(n: int, what: str) -> None:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
    """The n×n Sylvester–Hadamard matrix (entries ±1), built as H_2 ⊗ H_2 ⊗ ... ⊗ H_2."""
    _check_power_of_two(n, "hadamard_matrix: n")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


@functools.lru_cache(maxsize=32)
def _hadamard_cached(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return hadamard_matrix(n, dtype, device)


def fwht(x: torch.Tensor, radix_bits: int = 5) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last dimension: ``x @ H_n``.

    n (a power of two) is viewed as log2(n) axes of size 2, and H_n = H_2 ⊗ ... ⊗ H_2 is applied
    axis by axis (the butterfly). ``radix_bits`` = r groups r of those axes into one of size 2^r
    done as one small matmul with H_{2^r}: about log2(n)/r vectorised steps over the whole tensor
    instead of log2(n). ``radix_bits=1`` is the textbook radix-2 butterfly; r = 5 is 3-4x faster
    on CPU (each step reads and writes the whole tensor once, so fewer steps win). H H = n·I.
    """
    n = x.shape[-1]
    _check_power_of_two(n, "fwht: the length of the last dimension")
    if radix_bits < 1:
        raise ValueError(f"fwht: radix_bits must be >= 1, got {radix_bits}")
    bits = n.bit_length() - 1
    if bits == 0:
        return x.clone()
    steps = -(-bits // radix_bits)
    sizes = [bits // steps + (1 if i < bits % steps else 0) for i in range(steps)]
    lead = x.shape[:-1]
    pre = 1
    for b in sizes:
        s = 1 << b
        post = n // (pre * s)
        h = _hadamard_cached(s, x.dtype, x.device)
        # Last axis: (M, s) @ H (H is symmetric); inner axis: (s, s) @ (M, s, post).
        x = x.reshape(-1, s) @ h if post == 1 else torch.matmul(h, x.reshape(-1, s, post))
        pre *= s
    return x.reshape(*lead, n)


def fastfood_params(
    rows: int, length: int, total: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random B (signs), Π (as a flat gather index) and scaled G for ⌈rows/length⌉ blocks.

    Returns ``signs`` (k, L) of ±1, ``perm`` (k·L,) indices into the flattened (k, L) tensor
    (block j permutes within j·L ... j·L+L−1) and ``gauss`` (k, L) = G_j · s_j with
    s_j = 1/sqrt(total·ΣG_j²). Uses only ``generator``.
    """
    _check_power_of_two(length, "fastfood_params: length")
    k = -(-rows // length)
    signs = torch.randint(0, 2, (k, length), generator=generator).to(torch.float32).mul_(2).sub_(1)
    local = torch.rand(k, length, generator=generator).argsort(dim=1, stable=True)
    offsets = torch.arange(k).unsqueeze(1) * length
    index_dtype = torch.int32 if k * length < 2**31 else torch.int64
    perm = (local + offsets).reshape(-1).to(index_dtype)
    gauss = torch.randn(k, length, generator=generator)
    gauss = gauss / (float(total) * gauss.square().sum(dim=1, keepdim=True)).sqrt()
    return signs, perm, gauss


def fastfood(v: torch.Tensor, signs: torch.Tensor, perm: torch.Tensor, gauss: torch.Tensor) -> torch.Tensor:
    """Stacked Fastfood blocks applied to ``v`` (length L): s_j H G_j Π_j H B_j v for every j, flat."""
    x = fwht(v * signs)  # (k, L): H B_j v
    x = x.reshape(-1).index_select(0, perm).view_as(gauss) * gauss  # G_j Π_j (s_j folded into G_j)
    return fwht(x).reshape(-1)  # (k·L,)


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


def _weight(base: nn.Module) -> torch.Tensor:
    weight = base.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(base).__name__} has no weight tensor")
    return weight


def _bias(base: nn.Module) -> torch.Tensor | None:
    b = getattr(base, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def _rows(base: nn.Module, bias: bool) -> tuple[int, int]:
    """(weight values, bias values) that the projection covers in ``base``."""
    b = _bias(base)
    return int(_weight(base).numel()), (int(b.numel()) if bias and b is not None else 0)


class IntrinsicVector(nn.Module):
    """The adapter's trainable values: θ (d for DID, d − m for SAID) and SAID's m scalars λ."""

    def __init__(
        self, config: IntrinsicDimension, paths: list[str], total: int, device: torch.device | None
    ) -> None:
        super().__init__()
        self.signature = (config.d, config.structure, config.bias)
        said = config.structure == "said"
        width = config.d - len(paths) if said else config.d
        self.theta = nn.Parameter(torch.zeros(width, device=device))  # (d_θ,)
        self.lambdas: nn.Parameter | None = (
            nn.Parameter(torch.ones(len(paths), device=device)) if said else None
        )  # (m,)
        self.index = {p: i for i, p in enumerate(paths)}
        self.total = total
        self.length = 1 << (width - 1).bit_length()  # L: the next power of two >= d_θ

    def vector(self, path: str) -> torch.Tensor:
        """θ (times λ_path for SAID), zero-padded to L."""
        v = self.theta if self.lambdas is None else self.theta * self.lambdas[self.index[path]]
        return F.pad(v, (0, self.length - v.shape[0]))

    def extra_repr(self) -> str:
        m = 0 if self.lambdas is None else self.lambdas.numel()
        return f"theta={self.theta.numel()}, lambdas={m}, L={self.length}, D={self.total}"


@register
@dataclass(frozen=True, kw_only=True)
class IntrinsicDimension(Method):
    """Train d values and map them into the adapted weights by a fixed random Fastfood projection.

    Fields (paper values in brackets):
        d: the intrinsic dimension: how many values train (for SAID including its one λ per
            adapted module) [swept; the paper reports d90 in the hundreds to a few thousand].
        structure: "said" (one learned scale λ_i per adapted module, θ_i = θ0_i + λ_i P(θ)_i) or
            "did" (θ = θ0 + P θ) ["said", the paper's better variant].
        bias: also adapt each module's bias through the same projection [True: the paper
            projects every parameter of the model].
        lambda_lr_ratio: learning rate of SAID's λs / that of θ_d [1.0, one learning rate]. The m
            λs do not grow in number with d, θ_d does: a rate scaled for θ_d's size need not
            suit them.
    """

    d: int = param(1000, Int(min=1), "the intrinsic dimension: trainable values (SAID: including its λs)")
    structure: str = param("said", OneOf(("said", "did")), "said: one learned λ per module; did: none")
    bias: bool = param(True, Bool(), "also adapt each module's bias through the projection")
    lambda_lr_ratio: float = param(
        1.0, Float(0.0, low_open=True), "SAID: learning rate of the λs / that of θ_d"
    )

    name: ClassVar[str] = "intrinsic"

    def default_lr(self) -> float:
        """0.3 at d = 1000, times sqrt(1000 / d): Adam moves each of the d values by about the rate per
        step and P preserves norms, so the step in weight space grows as rate x sqrt(d); the scaling
        keeps it the same for every d."""
        return round(0.3 * math.sqrt(1000 / self.d), 4)

    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True  # θ = 0, so P θ = 0 exactly
    weight_space: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    layer_types: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "embedding")
    suite: ClassVar[Suite] = Suite(
        example={"d": 40},
        random_init=False,  # θ = 0, λ = 1 whatever the seed; the seed picks P (not stored)
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.structure == "did" and self.lambda_lr_ratio != 1.0:
            raise ValueError(
                "IntrinsicDimension.lambda_lr_ratio must be 1.0 with structure='did' (DID has no λ), "
                f"got {self.lambda_lr_ratio}"
            )

    # -- shared state -----------------------------------------------------------------------------
    def make_shared(self, bases: Mapping[str, nn.Module], generator: torch.Generator) -> IntrinsicVector:
        paths = list(bases)
        if self.structure == "said" and self.d <= len(paths):
            raise ValueError(
                f"IntrinsicDimension.d must be greater than the number of adapted modules ({len(paths)}) "
                f"with structure='said' (its one λ per module is counted in d), got {self.d}"
            )
        total = sum(sum(_rows(b, self.bias)) for b in bases.values())
        ref = next((p for b in bases.values() for p in b.parameters()), None)
        device = ref.device if ref is not None and ref.device.type != "meta" else None
        return IntrinsicVector(self, paths, total, device)

    def shared_parameter_count(self, bases: Mapping[str, nn.Module]) -> int:
        return self.d

    def shared_stored_bytes(self, bases: Mapping[str, nn.Module]) -> int:
        return 4 * self.d

    def parameter_groups(self, att: AdapterView, name: str) -> dict[str, tuple[list[nn.Parameter], float]]:
        """θ_d at the base learning rate, SAID's λs at ``lambda_lr_ratio`` times it."""
        shared = att.shared(name)
        if not isinstance(shared, IntrinsicVector):
            raise ValueError(f"IntrinsicDimension: adapter {name!r} has no intrinsic vector")
        groups: dict[str, tuple[list[nn.Parameter], float]] = {"theta": ([shared.theta], 1.0)}
        if shared.lambdas is not None:
            groups["lambdas"] = ([shared.lambdas], self.lambda_lr_ratio)
        return groups

    # -- per module: nothing trains or is stored but the shared vector --------------------------
    def parameter_count(self, base: nn.Module) -> int:
        return 0

    def stored_bytes(self, base: nn.Module) -> int:
        return 0

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> IntrinsicLayer:
        kind = module_kind(base)
        if kind not in self.layer_types:
            raise ValueError(
                f"IntrinsicDimension: {path!r} is {type(base).__name__}, not a linear, Conv1D or "
                "embedding module"
            )
        if not isinstance(shared, IntrinsicVector) or shared.signature != (self.d, self.structure, self.bias):
            raise ValueError(
                f"IntrinsicDimension: {path!r} overrides d/structure/bias; the projection is shared by "
                "every module, so those fields must be the same everywhere"
            )
        if kind == "embedding" and getattr(base, "max_norm", None) is not None:
            raise ValueError(
                f"IntrinsicDimension: {path!r} is an Embedding with max_norm, which renormalises its "
                "weight in place; adapt it only without max_norm"
            )
        return IntrinsicLayer(self, kind, base, shared, path, generator)


class IntrinsicLayer(ReplacingLayer):
    """One module's slice of P θ: its random blocks (buffers, never saved) and the math using them.

    It replaces the module's computation (one matmul with W + ΔW instead of base + delta: the
    extra matmul of an additive delta would cost as much as the base layer itself). For a base in
    a lower precision than float32 it adds a float32 delta to the base's output instead, as
    rounding W + ΔW to bfloat16 would erase the small ΔW.
    """

    _shared: IntrinsicVector
    signs: torch.Tensor
    perm: torch.Tensor
    gauss: torch.Tensor

    def __init__(
        self,
        config: IntrinsicDimension,
        kind: str,
        base: nn.Module,
        shared: IntrinsicVector,
        path: str,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.config = config
        self.kind = kind
        self.path = path
        self.weight_shape = tuple(_weight(base).shape)
        self.weight_rows, self.bias_rows = _rows(base, config.bias)
        # F.embedding's options (padding row, ...): what the base embedding passes, read once.
        self.embedding_options: tuple[int | None, float, bool, bool] | None = None
        if kind == "embedding":
            padding_idx = getattr(base, "padding_idx", None)
            self.embedding_options = (
                None if padding_idx is None else int(padding_idx),
                float(getattr(base, "norm_type", 2.0)),
                bool(getattr(base, "scale_grad_by_freq", False)),
                bool(getattr(base, "sparse", False)),
            )
        signs, perm, gauss = fastfood_params(
            self.weight_rows + self.bias_rows, shared.length, shared.total, generator
        )
        device = shared.theta.device
        # Regenerated from the seed at inject time, so not part of the state dict (not saved).
        self.register_buffer("signs", signs.to(device), persistent=False)
        self.register_buffer("perm", perm.to(device), persistent=False)
        self.register_buffer("gauss", gauss.to(device), persistent=False)
        object.__setattr__(self, "_shared", shared)  # owned by the attachment, saved once
        # P θ under no_grad, valid while θ, λ and the blocks are unchanged (deltatune._cache).
        self._cache: Memo[torch.Tensor] = Memo()

    def _flat(self) -> torch.Tensor:
        """This module's slice of P θ (weight values, then bias values)."""
        shared = self._shared
        sources = (shared.theta, shared.lambdas, self.signs, self.perm, self.gauss)
        cached = self._cache.get(*sources) if not torch.is_grad_enabled() else None
        if cached is not None:
            return cached
        flat = fastfood(shared.vector(self.path), self.signs, self.perm, self.gauss)
        flat = flat[: self.weight_rows + self.bias_rows]
        if not torch.is_grad_enabled():
            self._cache.put(flat, *sources)
        return flat

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's layout."""
        return self._flat()[: self.weight_rows].view(self.weight_shape)

    def delta_bias(self) -> torch.Tensor | None:
        """Δb, or None when the bias is not adapted."""
        if not self.bias_rows:
            return None
        return self._flat()[self.weight_rows :]

    def _compute(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv1d":  # transformers' Conv1D: x @ W + b, W stored (in, out)
            flat = x.reshape(-1, x.shape[-1])
            out = torch.addmm(bias, flat, weight) if bias is not None else flat @ weight
            return out.view(*x.shape[:-1], weight.shape[1])
        assert self.embedding_options is not None  # kind == "embedding"
        padding_idx, norm_type, scale_grad_by_freq, sparse = self.embedding_options
        return F.embedding(x, weight, padding_idx, None, norm_type, scale_grad_by_freq, sparse)

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat()
        dw = flat[: self.weight_rows].view(self.weight_shape)
        db = flat[self.weight_rows :] if self.bias_rows else None
        weight = _weight(base)
        if weight.dtype != dw.dtype:
            out: torch.Tensor = base(x)
            return out + self._delta(x, dw, db).to(out.dtype)
        bias = _bias(base)
        if bias is not None and db is not None:
            bias = bias + db
        return self._compute(x, weight + dw, bias)

    def _delta(self, x: torch.Tensor, dw: torch.Tensor, db: torch.Tensor | None) -> torch.Tensor:
        dtype = compute_dtype(x, dw)
        x = x.to(dtype) if x.is_floating_point() else x
        return self._compute(x, dw.to(dtype), None if db is None else db.to(dtype))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x + Δb, in float32 (what per-example routing adds to the base's output)."""
        return self._delta(x, self.delta_weight(), self.delta_bias())

    def merged(self, base: nn.Module) -> nn.Module:
        """A plain copy of ``base`` with W + ΔW (and b + Δb)."""
        with torch.no_grad():
            out = merged_linear(base, self.delta_weight())
            db = self.delta_bias()
            bias = _bias(base)
            if db is not None and bias is not None:
                out.bias = nn.Parameter((bias.float() + db.float()).to(bias.dtype), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, weight={self.weight_shape}, bias_rows={self.bias_rows}, "
            f"blocks={tuple(self.gauss.shape)}"
        )
