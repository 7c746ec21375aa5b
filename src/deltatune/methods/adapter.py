"""Bottleneck adapters: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
arXiv:1902.00751; Pfeiffer et al. 2020, "AdapterFusion", arXiv:2005.00247; parallel placement from
He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv:2110.04366.

    sequential (houlsby, pfeiffer):  y = h + s · W_up f(W_down h + b_down) + s · b_up,   h = module(x)
    parallel:                        y = module(x) + s · (W_up f(W_down x + b_down) + b_up)

with W_down: (m, d), W_up: (d, m), bottleneck m = d / reduction_factor (or ``bottleneck``), f a
nonlinearity and s = ``scaling``. Placements (found with :mod:`deltatune.anatomy` when no targets are
given): ``"houlsby"`` after the attention output projection and after the FFN output projection of
every block (Houlsby et al. Fig. 2), ``"pfeiffer"`` after the FFN output projection only, ``"parallel"``
beside the whole FFN module (reads its input, adds to its output; He et al. §3, scaling 4 in their
best setting). W_down starts like ``nn.Linear`` (Kaiming-uniform), W_up and the biases at zero, so
the adapted model equals the base at init. The nonlinearity makes the adapter impossible to fold into
the weights: it is not mergeable.

Closed forms, per adapted module with adapter width d and bottleneck m:

    trainable = stored = 2 · d · m + m + d          stored bytes = 4 · (2 · d · m + m + d)   (float32)

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deltatune import inject
    >>> net = nn.Sequential(nn.Linear(16, 16))
    >>> att = inject(net, Adapter(bottleneck=4), targets=["0"])
    >>> att.closed_form("default")
    (148, 592)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import anatomy
from ..contract import AdditiveLayer, Method, Suite, register
from ..contract.fields import Float, IntOrNone, OneOf, param
from ..kernels.lowrank import compute_dtype
from ..targets import module_kind, shape_of

NONLINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "swish": F.silu,
}
DEFAULT_REDUCTION = 16  # Pfeiffer et al. 2020 (and Houlsby et al.'s m = 64 for d = 768 is 12)


def io_features(module: nn.Module, path: str) -> tuple[int, int]:
    """(input width, output width) of a linear-like module, or of a block made of them (its first
    linear's input, its last linear's output: GPT-2's and Llama's MLP)."""
    if module_kind(module) in ("linear", "conv1d"):
        return shape_of(module)
    linears = [m for m in module.modules() if module_kind(m) in ("linear", "conv1d")]
    if not linears:
        raise ValueError(
            f"Adapter: {path!r} ({type(module).__name__}) holds no linear layer to size the adapter"
        )
    return shape_of(linears[0])[0], shape_of(linears[-1])[1]


def adapter_float(base: nn.Module) -> torch.dtype:
    """float32 on a float32/bf16/fp16 base, float64 on a float64 base."""
    p = next(base.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.promote_types(dtype, torch.float32)


@register
@dataclass(frozen=True, kw_only=True)
class Adapter(Method):
    """A bottleneck adapter (down-project, nonlinearity, up-project, residual).

    Fields (paper defaults in brackets):
        placement: "houlsby" (after attention and FFN outputs), "pfeiffer" (after the FFN output) or
            "parallel" (beside the FFN) ["houlsby"]. Picks the default targets; with explicit targets
            on a model :mod:`deltatune.anatomy` knows, the targets must be places of that placement.
        reduction_factor: m = d / reduction_factor [16 when neither it nor bottleneck is given].
        bottleneck: m, the bottleneck width (give this or reduction_factor, not both) [None].
        nonlinearity: f [relu; Pfeiffer et al.].
        scaling: s, multiplies the adapter's output [1.0; He et al. use 4 for parallel adapters].
    """

    placement: str = param("houlsby", OneOf(("houlsby", "pfeiffer", "parallel")), "where adapters go")
    reduction_factor: int | None = param(None, IntOrNone(min=1), "bottleneck m = width / reduction_factor")
    bottleneck: int | None = param(None, IntOrNone(min=1), "bottleneck width m (instead of reduction_factor)")
    nonlinearity: str = param("relu", OneOf(tuple(NONLINEARITIES)), "nonlinearity between the projections")
    scaling: float = param(1.0, Float(low=0.0, low_open=True), "scale s of the adapter's output")

    name: ClassVar[str] = "adapter"
    identity_at_init: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    layer_types: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "block", "experts")
    suite: ClassVar[Suite] = Suite(example={"bottleneck": 4})

    def default_lr(self) -> float:
        """3e-3, chosen on SST-2's validation split (MiniLM, m = d/16, 150 steps: benchmarks/README.md,
        "Each method at its own learning rate"): Houlsby 83.6 at 3e-3 (82.5 at 1e-3, 56.3 at 1e-2),
        Pfeiffer 82.7 at 3e-3 (81.2 at 1e-3, 80.8 at 1e-2)."""
        return 3e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduction_factor is not None and self.bottleneck is not None:
            raise ValueError(
                f"Adapter.bottleneck must be None when reduction_factor is given (got reduction_factor="
                f"{self.reduction_factor}, bottleneck={self.bottleneck}): give one of them"
            )

    @property
    def reads(self) -> str:
        return "input" if self.placement == "parallel" else "output"

    def width(self, base: nn.Module, path: str = "") -> tuple[int, int]:
        """(d, m): the adapter's width (what it reads and adds to) and its bottleneck."""
        d_in, d_out = io_features(base, path)
        if d_in != d_out and self.reads == "input":
            raise ValueError(
                f"Adapter(placement='parallel'): {path!r} maps width {d_in} to {d_out}; a parallel adapter "
                "needs a module whose input and output widths agree (a whole FFN)"
            )
        d = d_out
        if self.bottleneck is not None:
            return d, self.bottleneck
        factor = self.reduction_factor if self.reduction_factor is not None else DEFAULT_REDUCTION
        if d < factor:
            raise ValueError(
                f"Adapter.reduction_factor must be <= the width {d} of {path!r}, got {factor}; "
                "give a smaller reduction_factor or a bottleneck size"
            )
        return d, d // factor

    # -- where --------------------------------------------------------------------------------
    def default_targets(self, model: nn.Module) -> list[str]:
        parts = anatomy.describe(model)
        if self.placement == "parallel":
            if parts.anatomy.ffn is None:
                raise ValueError(
                    f"Adapter.placement='parallel' needs one module mapping the FFN input to its output; "
                    f"{type(model).__name__}'s FFN is split across modules (Anatomy.ffn is None): use "
                    "placement 'houlsby' or 'pfeiffer', or pass targets"
                )
            return parts.paths("ffn")
        if self.placement == "pfeiffer":
            return parts.paths("ffn_output")
        return parts.paths("attention_output", "ffn_output")

    def check_targets(self, model: nn.Module, paths: list[str]) -> None:
        try:
            allowed = set(self.default_targets(model))
        except ValueError:
            return  # a model anatomy does not know: the targets given are the places
        wrong = [p for p in paths if p not in allowed]
        if wrong:
            raise ValueError(
                f"Adapter.placement={self.placement!r} puts adapters at {sorted(allowed)[:4]}...; "
                f"{wrong[:4]} are not such places: give no targets, or change placement"
            )

    # -- what ---------------------------------------------------------------------------------
    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> AdapterLayer:
        d, m = self.width(base, path)
        layer = AdapterLayer(self, d, m, adapter_float(base), path)
        bound = 1.0 / math.sqrt(d)  # nn.Linear's default init of the down projection
        layer.down.data.uniform_(-bound, bound, generator=generator)
        return layer

    def parameter_count(self, base: nn.Module) -> int:
        d, m = self.width(base)
        return 2 * d * m + m + d

    def stored_bytes(self, base: nn.Module) -> int:
        return self.parameter_count(base) * adapter_float(base).itemsize


class AdapterLayer(AdditiveLayer):
    """The trainable bottleneck of one adapter; its ``delta`` reads the base output (sequential) or
    the base input (parallel), as the ``reads`` attribute tells the core."""

    def __init__(self, config: Adapter, d: int, m: int, dtype: torch.dtype, path: str) -> None:
        super().__init__()
        self.reads = config.reads
        self.scaling = config.scaling
        self.nonlinearity = config.nonlinearity
        self.path = path
        self.down = nn.Parameter(torch.zeros(m, d, dtype=dtype))  # (m, d)
        self.down_bias = nn.Parameter(torch.zeros(m, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(d, m, dtype=dtype))  # (d, m): zero, so identity at init
        self.up_bias = nn.Parameter(torch.zeros(d, dtype=dtype))

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """s · (W_up f(W_down h + b_down) + b_up) for ``h`` of shape (..., d)."""
        if not isinstance(h, torch.Tensor):
            raise ValueError(
                f"Adapter at {self.path!r}: the module's {self.reads} is a {type(h).__name__}, not a tensor; "
                "place the adapter on a module whose input and output are tensors"
            )
        dtype = compute_dtype(h, self.down)
        down_bias = None if self.down_bias is None else self.down_bias.to(dtype)
        z = NONLINEARITIES[self.nonlinearity](F.linear(h.to(dtype), self.down.to(dtype), down_bias))
        up_bias = None if self.up_bias is None else self.up_bias.to(dtype)
        return F.linear(z, self.up.to(dtype), up_bias) * self.scaling  # (..., d)

    def extra_repr(self) -> str:
        return f"d={self.up.shape[0]}, m={self.down.shape[0]}, reads={self.reads}, scaling={self.scaling:g}"
