"""VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks (Li, Han, Ji; NeurIPS 2024),
arXiv:2405.15179.

    ΔW = B A,  y = W0 x + B (A dropout(x))      (no alpha/r scaling)

Every column of B and row of A is cut into sub-vectors of length b. Each sub-vector s has its own
logits z_s over one global bank V of h vectors of length b, shared by every adapted matrix of the
model, and is a top-k admixture of bank vectors:

    s = Σ_{j ∈ topk(z_s)} softmax(z_s[topk])_j · V[j]

Only the bank and, per sub-vector, the k indices and k−1 free weights (they sum to 1) need to be
stored. With N_sub = r · (in/b + out/b) sub-vectors in a module and c_idx bytes per index (1 for
h ≤ 256, 2 up to 32768, else 4):

    trainable = h·b (bank, once per adapter) + Σ_modules N_sub · h   (logits)
    stored ("topk" mode) = 4·h·b + Σ_modules N_sub · (4·(k−1) + k·c_idx) bytes
    stored ("logits" mode, to keep training) = 4 · trainable bytes

Design notes:
* The k-th weight is computed as 1 − Σ(first k−1) in the forward pass too, so a top-k file that
  stores k−1 weights reproduces the outputs bit for bit.
* A top-k checkpoint stays trainable (PEFT's raises): loading writes logits log(w) for the stored
  vectors and (smallest of those − 1) for the others, so the softmax over the top k is the stored
  mixture and the logits train from there. Until the logits change, the stored weights are used as
  they are (exactness).
* Under ``torch.no_grad``/``inference_mode`` the materialised A and B are cached and reused until a
  logit or the bank changes: written in place (version counters), re-assigned through ``.data``
  (``vector_to_parameters``), cast or moved (storage, dtype, device; see :mod:`deltatune._cache`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deltatune import VBLoRA, inject, parameter_report
    >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    >>> att = inject(net, VBLoRA(rank=4, num_vectors=32, vector_length=16), targets=["0", "2"])
    >>> att.closed_form("default")[0]  # bank 32*16 + logits 2 modules * 4*(4+4) sub-vectors * 32
    2560
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..._cache import Memo
from ...contract import AdapterView, LowRankLayer, Suite, register
from ...contract.fields import Float, Int, OneOf, param
from ...targets import module_kind, shape_of
from .base import LowRank, linear_like


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type that holds every index in [0, num_vectors)."""
    if num_vectors <= 256:
        return torch.uint8
    if num_vectors <= 2**15:
        return torch.int16
    return torch.int32


def mixture_weights(top_logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, with the last weight written as 1 − (sum of the others)."""
    w = torch.softmax(top_logits, dim=-1)
    if w.shape[-1] == 1:
        return w
    free = w[..., :-1]
    return torch.cat([free, 1.0 - free.sum(dim=-1, keepdim=True)], dim=-1)


def admix(weights: torch.Tensor, indices: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Σ_j weights_j · bank[indices_j]: (..., k), (..., k), (h, b) -> (..., b)."""
    # A broadcast multiply and sum: 1.5x faster than the equivalent einsum on CPU for these shapes.
    return (weights.unsqueeze(-1) * bank[indices.long()]).sum(dim=-2)


class VectorBank(nn.Module):
    """The one bank of an adapter, shared by every adapted module."""

    def __init__(
        self, num_vectors: int, vector_length: int, bound: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        bank = torch.empty(num_vectors, vector_length).uniform_(-bound, bound, generator=generator)
        self.bank = nn.Parameter(bank)  # (h, b)


@register
@dataclass(frozen=True, kw_only=True)
class VBLoRA(LowRank, defaults={"rank": 4}):
    """LoRA factors built from one shared bank of vectors (top-k admixtures).

    Fields (paper defaults in brackets):
        rank: r, rank of ΔW = B A [4].
        num_vectors: h, vectors in the bank [256 for Llama2 and RoBERTa-large; 90 in the GLUE runs].
        vector_length: b, length of each bank vector; must divide every adapted dimension [256].
            Given explicitly, a dimension it does not divide is an error; left at its default in
            ``deltatune train``, :meth:`fit_to` lowers it to the largest divisor of every adapted
            dimension that is <= 256 (MiniLM's 384-wide layers: 192).
        topk: k, bank vectors mixed per sub-vector [2; the paper's ablation finds k=1 clearly worse].
        logits_std: σ of the N(0, σ) logit init [0.01 in the official code; PEFT uses 0.1].
        bank_bound: the bank starts U(−bound, bound), never zero (zero would give zero gradients) [0.02].
        dropout: dropout on the adapter's input [0.0].
        logits_lr_ratio: learning rate of the logits / that of the bank [10: 1e-2 vs 1e-3 in the paper].
        save_mode: "topk" stores indices + k−1 weights; "logits" stores all logits (to keep training
            with the exact optimizer state) ["topk"].
        weight_dtype: "float32" (exact round trip) or "float16" (half the weight bytes; the rounding
            error is reported by :func:`storage_error`) ["float32"].
    """

    num_vectors: int = param(256, Int(min=2), "h, the number of vectors in the shared bank")
    vector_length: int = param(
        256,
        Int(min=1),
        "b, sub-vector length; must divide every adapted dimension (deltatune train, when it is not "
        "given: the largest divisor of them all up to 256)",
    )
    topk: int = param(2, Int(min=1), "k, bank vectors mixed per sub-vector (<= num_vectors)")
    logits_std: float = param(0.01, Float(0.0, low_open=True), "std of the normal init of the logits")
    bank_bound: float = param(0.02, Float(0.0, low_open=True), "bank init is uniform in [-bound, bound]")
    logits_lr_ratio: float = param(
        10.0, Float(0.0, low_open=True), "logits learning rate / bank learning rate"
    )
    save_mode: str = param("topk", OneOf(("topk", "logits")), "what the adapter file stores")
    weight_dtype: str = param(
        "float32",
        OneOf(("float32", "float16")),
        "dtype of the stored top-k weights (float16: see storage_error)",
    )

    name: ClassVar[str] = "vblora"

    def default_lr(self) -> float:
        """1e-2 for the bank (the logits at logits_lr_ratio times it), which every module shares; chosen on
        SST-2's validation split (MiniLM, query/value, 150 steps: benchmarks/README.md, "Each method at its
        own learning rate"): 82.9 at 1e-2, 80.7 at 3.3e-3, 80.6 at 3e-2."""
        return 1e-2

    identity_at_init: ClassVar[bool] = False  # the bank is never zero, so ΔW is small but not zero
    suite: ClassVar[Suite] = Suite(example={"rank": 2, "num_vectors": 16, "vector_length": 8})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.topk > self.num_vectors:
            raise ValueError(f"VBLoRA.topk must be <= num_vectors ({self.num_vectors}), got {self.topk}")

    # -- shared state -----------------------------------------------------------------------------
    def make_shared(self, bases: Mapping[str, nn.Module], generator: torch.Generator) -> VectorBank:
        return VectorBank(self.num_vectors, self.vector_length, self.bank_bound, generator)

    def shared_parameter_count(self, bases: Mapping[str, nn.Module]) -> int:
        return self.num_vectors * self.vector_length

    def shared_stored_bytes(self, bases: Mapping[str, nn.Module]) -> int:
        return 4 * self.shared_parameter_count(bases)

    def fit_to(self, bases: Mapping[str, nn.Module], given: Collection[str]) -> VBLoRA:
        """This config, with ``vector_length`` (unless ``given``) lowered to divide every adapted dimension.

        The largest divisor of the greatest common divisor of all in/out dimensions that is at most
        the current value: 256 stays on 768- or 4096-wide models, 384-wide ones get 192.
        """
        if "vector_length" in given:
            return self
        dims = [d for base in bases.values() if module_kind(base) in self.layer_types for d in shape_of(base)]
        common = math.gcd(*dims) if dims else 0
        if not common or common % self.vector_length == 0:
            return self
        length = max(d for d in range(1, min(common, self.vector_length) + 1) if common % d == 0)
        return dataclasses.replace(self, vector_length=length)

    # -- per module -------------------------------------------------------------------------------
    def sub_vectors(self, base: nn.Module) -> int:
        in_features, out_features = shape_of(base)
        return self.rank * (in_features // self.vector_length + out_features // self.vector_length)

    def parameter_count(self, base: nn.Module) -> int:
        return self.sub_vectors(base) * self.num_vectors

    def stored_bytes(self, base: nn.Module) -> int:
        if self.save_mode == "logits":
            return 4 * self.parameter_count(base)
        per_index = torch.empty((), dtype=index_dtype(self.num_vectors)).element_size()
        per_weight = 2 if self.weight_dtype == "float16" else 4
        return self.sub_vectors(base) * (per_weight * (self.topk - 1) + self.topk * per_index)

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> VBLoRALayer:
        kind, in_features, out_features = linear_like(base, path, "VBLoRA", self.layer_types)
        if not isinstance(shared, VectorBank) or tuple(shared.bank.shape) != (
            self.num_vectors,
            self.vector_length,
        ):
            raise ValueError(
                f"VBLoRA: {path!r} overrides num_vectors/vector_length; the bank is shared by every module, "
                "so those fields must be the same everywhere"
            )
        for what, dim in (("in_features", in_features), ("out_features", out_features)):
            if dim % self.vector_length:
                raise ValueError(
                    f"VBLoRA: {path!r} has {what}={dim}, not divisible by "
                    f"vector_length={self.vector_length}; choose a vector_length that divides every "
                    f"adapted dimension (e.g. a divisor of {dim})"
                )
        return VBLoRALayer(self, kind, in_features, out_features, shared, path, generator)

    def parameter_groups(self, att: AdapterView, name: str) -> dict[str, tuple[list[nn.Parameter], float]]:
        """The bank at the base learning rate, the logits at ``logits_lr_ratio`` times it."""
        bank = att.shared(name)
        logits = [
            p
            for layer in att.adapter_layers(name).values()
            if isinstance(layer, VBLoRALayer)
            for p in (layer.logits_A, layer.logits_B)
        ]
        groups: dict[str, tuple[list[nn.Parameter], float]] = {"logits": (logits, self.logits_lr_ratio)}
        if bank is not None:
            groups["vector_bank"] = (list(bank.parameters()), 1.0)
        return groups


class VBLoRALayer(LowRankLayer):
    """Logits of one adapted module; the bank is reached through the shared module, not owned."""

    _shared: VectorBank

    def __init__(
        self,
        config: VBLoRA,
        kind: str,
        in_features: int,
        out_features: int,
        shared: VectorBank,
        path: str,
        generator: torch.Generator,
    ) -> None:
        super().__init__(kind, 1.0, config.dropout)
        self.config = config
        self.path = path
        b, h, r = config.vector_length, config.num_vectors, config.rank
        self.logits_A = nn.Parameter(
            torch.randn(r, in_features // b, h, generator=generator) * config.logits_std
        )
        self.logits_B = nn.Parameter(
            torch.randn(out_features // b, r, h, generator=generator) * config.logits_std
        )
        # Not a submodule: the bank belongs to the attachment and must be saved and counted once.
        object.__setattr__(self, "_shared", shared)
        # Cached values, each valid while the tensors it came from are unchanged (storage, version,
        # dtype, device: deltatune._cache): the factors built under no_grad, and per factor the
        # stored top-k mixture (indices, weights) a loaded file gave, until its logits change.
        self._cache: Memo[tuple[torch.Tensor, torch.Tensor]] = Memo()
        self._fixed: dict[str, Memo[tuple[torch.Tensor, torch.Tensor]]] = {"A": Memo(), "B": Memo()}

    @property
    def bank(self) -> torch.Tensor:
        return self._shared.bank

    def _mix(self, which: str) -> torch.Tensor:
        logits: torch.Tensor = getattr(self, f"logits_{which}")
        fixed = self._fixed[which].get(logits)
        if fixed is not None:
            # Loaded from a top-k file and not changed since (not trained, re-assigned, cast or
            # moved): the stored mixture, exactly, with the gradient of the softmax of the (rebuilt)
            # logits, so that training starts from here.
            indices, stored = fixed
            soft = mixture_weights(logits.gather(-1, indices))
            weights = stored + (soft - soft.detach())
            return admix(weights, indices, self.bank)
        self._fixed[which].clear()
        top, indices = logits.topk(self.config.topk, dim=-1)
        return admix(mixture_weights(top), indices, self.bank)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, in) and B (out, r), materialised from the bank."""
        sources = (self.logits_A, self.logits_B, self.bank)
        cached = self._cache.get(*sources) if not torch.is_grad_enabled() else None
        if cached is not None:
            return cached
        r = self.logits_A.shape[0]
        A = self._mix("A").reshape(r, -1)  # (r, in/b, b) -> (r, in)
        B = self._mix("B").transpose(1, 2).reshape(-1, r)  # (out/b, r, b) -> (out/b, b, r) -> (out, r)
        if not torch.is_grad_enabled():
            self._cache.put((A, B), *sources)
        return A, B

    def export_state(self) -> dict[str, torch.Tensor]:
        if self.config.save_mode == "logits":
            return {"logits_A": self.logits_A.detach(), "logits_B": self.logits_B.detach()}
        out: dict[str, torch.Tensor] = {}
        dtype = index_dtype(self.config.num_vectors)
        for which in ("A", "B"):
            logits: torch.Tensor = getattr(self, f"logits_{which}")
            fixed = self._fixed[which].get(logits)
            if fixed is not None:
                indices, weights = fixed
            else:
                top, indices = logits.detach().topk(self.config.topk, dim=-1)
                weights = mixture_weights(top)
            out[f"topk_indices_{which}"] = indices.to(dtype)
            stored = weights[..., :-1].detach()
            out[f"topk_weights_{which}"] = stored.to(getattr(torch, self.config.weight_dtype)).contiguous()
        return out

    def import_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if "logits_A" in state:
            with torch.no_grad():
                self.logits_A.copy_(state["logits_A"])
                self.logits_B.copy_(state["logits_B"])
            for memo in self._fixed.values():
                memo.clear()
            self._cache.clear()
            return
        h, k = self.config.num_vectors, self.config.topk
        for which in ("A", "B"):
            indices = state[f"topk_indices_{which}"].long()
            free = state[f"topk_weights_{which}"].float()
            where = f"VBLoRA: {self.path!r} top-k {which}"
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= h):
                raise ValueError(f"{where}: indices must be in [0, {h}), found {int(indices.max())}")
            if free.numel() and float(free.min()) < 0:
                raise ValueError(f"{where}: weights must be >= 0, found {float(free.min()):.3g}")
            total = free.sum(dim=-1, keepdim=True)
            if total.numel() and float(total.max()) > 1.0 + 1e-5:
                raise ValueError(
                    f"{where}: the k-1 stored weights must sum to <= 1, found {float(total.max()):.6f}"
                )
            if k > 1 and bool((indices[..., :, None] == indices[..., None, :]).sum((-1, -2)).gt(k).any()):
                raise ValueError(f"{where}: an index repeats within one sub-vector")
            weights = torch.cat([free, 1.0 - total], dim=-1) if k > 1 else torch.ones(*free.shape[:-1], 1)
            logits: torch.Tensor = getattr(self, f"logits_{which}")
            chosen = weights.clamp_min(1e-12).log()  # softmax(log w) = w: the same mixture, trainable
            floor = chosen.min(dim=-1, keepdim=True).values - 1.0
            with torch.no_grad():
                logits.copy_(floor.expand_as(logits))
                logits.scatter_(-1, indices, chosen.to(logits.dtype))
            self._fixed[which].put(
                (indices.to(logits.device), weights.to(logits.device, logits.dtype)), logits
            )
        self._cache.clear()

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, rank={self.config.rank}, sub_vectors_A={tuple(self.logits_A.shape[:2])}, "
            f"sub_vectors_B={tuple(self.logits_B.shape[:2])}, topk={self.config.topk}"
        )


def storage_error(att: AdapterView, name: str) -> float:
    """How far the stored adapter is from the live one: max |ΔW_stored − ΔW| / max |ΔW| over modules.

    0.0 for float32 top-k or logits files; small (about 1e-3) for ``weight_dtype="float16"``.
    """
    worst = 0.0
    for layer in att.adapter_layers(name).values():
        if not isinstance(layer, VBLoRALayer):
            continue
        with torch.no_grad():
            exact = layer.delta_weight()
            state = layer.export_state()
            probe = copy.deepcopy(layer)  # (with its own copy of the bank: nothing live is touched)
            probe.import_state(state)
            stored = probe.delta_weight()
        scale = float(exact.abs().max()) or 1.0
        worst = max(worst, float((stored - exact).abs().max()) / scale)
    return worst
