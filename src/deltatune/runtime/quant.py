"""4-bit frozen bases: QLoRA and QPiSSA.

* **QLoRA** (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, arXiv:2305.14314): store the frozen base
  weights in 4-bit NormalFloat (NF4, block-wise absmax scaling with double-quantised scales) and train
  a LoRA adapter in higher precision on top: ``y = dequant(W4) x + s·B A x``.
* **QPiSSA** (Meng et al. 2024, arXiv:2404.02948 §4.3): quantise PiSSA's *residual* instead of W. The
  principal components, which hold the large outliers that NF4 represents worst, stay in the float
  adapter, so ``‖W − (dequant(nf4(W_res)) + s·B A)‖`` is much smaller than QLoRA's ``‖W − dequant(nf4(W))‖``.
  With ``iterations = T > 1`` the factors are refit T − 1 times to what quantisation left out
  (``B A = SVD_r(W − dequant(nf4(W − s·B A)))``, the multi-iteration scheme of the paper's appendix,
  also LoftQ's, arXiv:2310.08659).

The quantiser is torchao's NF4 (``torchao.quantization ... nf4_tensor.to_nf4``), which runs on CPU and
GPU; nothing here re-implements it. Usage::

    inject(model, LoRA(rank=16, init=PiSSA()), targets=...)   # 1. initialise from the float weights
    quantize(model, iterations=5)                              # 2. quantise the residual (QPiSSA)
    # or, for QLoRA: quantize(model) first, then inject(model, LoRA(...))

Merging into a 4-bit base would need re-quantisation, which loses most of the update:
``merge(model)`` refuses, ``merge(model, dequantize=True)`` returns float ``nn.Linear`` modules holding
``dequant(W4) + ΔW``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import nn

from ..contract import float_weight_reason, hooks
from ..methods.lowrank.lora import LoRALayer
from ..methods.lowrank.pissa import split_components
from ..targets import ALL_LINEAR, TargetSpec, resolve
from .wrapper import (
    Adapted,
    Attachment,
    all_or_nothing,
    attachment_of,
    base_modules,
    has_adapters,
    set_submodule,
)


def scaler_blocks(numel: int, block_size: int, scaler_block_size: int | None, where: str) -> int:
    """The scaler block size for a weight of ``numel`` values (torchao needs it to divide the blocks).

    ``None`` picks QLoRA's 256 when it divides the number of blocks, else the largest divisor <= 256
    (SmolLM2's 576 x 576 weights have 5184 blocks of 64: 216).
    """
    if numel % block_size:
        raise ValueError(
            f"quantize: {where} has {numel} values, not a multiple of block_size={block_size}; "
            "exclude it or choose another block_size"
        )
    blocks = numel // block_size
    if scaler_block_size is None:
        return max(d for d in range(1, min(256, blocks) + 1) if blocks % d == 0)
    if blocks % scaler_block_size:
        raise ValueError(
            f"quantize: {where} has {blocks} blocks of {block_size}, not a multiple of "
            f"scaler_block_size={scaler_block_size}; pass scaler_block_size=None to choose one"
        )
    return scaler_block_size


def _nf4() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """torchao's ``to_nf4`` and ``linear_nf4``, with a clear error when torchao is missing."""
    try:
        # torchao logs warnings about CUDA extensions it cannot load on CPU machines: harmless here.
        quiet = logging.getLogger("torchao")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (  # type: ignore[import-untyped]
                linear_nf4,
                to_nf4,
            )
        except ImportError:  # older torchao layout
            from torchao.dtypes.nf4tensor import linear_nf4, to_nf4  # type: ignore[import-untyped, no-redef]
        finally:
            quiet.setLevel(level)
    except ImportError as err:
        raise ValueError(
            "4-bit bases need torchao (pip install 'deltatune[quant]' or pip install torchao)"
        ) from err
    return to_nf4, linear_nf4


FORMATS = ("nf4",)  # the 4-bit formats of a frozen base: what --quantize takes


@dataclasses.dataclass(frozen=True)
class NF4Settings:
    """How a weight was quantised: what re-quantising it the same way takes.

    ``scaler_block_size`` as asked (None: chosen per weight, :func:`scaler_blocks`); ``iterations``
    the QPiSSA rounds of a residual (None: the plain weight was quantised, QLoRA)."""

    block_size: int = 64
    scaler_block_size: int | None = None
    iterations: int | None = None


class NF4Linear(nn.Linear):
    """A frozen linear layer whose weight is stored in NF4 (torchao's ``NF4Tensor``).

    It answers for the float ``nn.Linear`` it was made from: ``source_class`` and ``source_hash``
    (the content hash of that weight, :func:`deltatune.runtime.fingerprint.content_hash`) are what an
    adapter's fingerprint records, so an adapter saved on it loads on the float base and back."""

    quantized: ClassVar[bool] = True
    source_class: ClassVar[str] = "Linear"

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        settings: NF4Settings = NF4Settings(),
        source_hash: str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)  # type: ignore[assignment]
        self.settings = settings
        self.source_hash = source_hash

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        block_size: int = 64,
        scaler_block_size: int | None = None,
        iterations: int | None = None,
        source: torch.Tensor | None = None,
    ) -> NF4Linear:
        """Quantise ``weight``; ``source``: the float weight it stands for (default ``weight``;
        QPiSSA passes the full weight whose residual ``weight`` is)."""
        from .fingerprint import content_hash

        to_nf4, _ = _nf4()
        scalers = scaler_blocks(
            weight.numel(), block_size, scaler_block_size, f"a {tuple(weight.shape)} weight"
        )
        return cls(
            to_nf4(weight.detach(), block_size, scalers),
            bias,
            settings=NF4Settings(block_size, scaler_block_size, iterations),
            source_hash=content_hash(weight if source is None else source),
        )

    def storage_bytes(self) -> int:
        """Bytes the 4-bit weight takes: the packed values, the 8-bit block scalers and their
        float32 factors, the mean and the 16-value code book (about 4.13 bits per value)."""
        w = self.weight
        parts = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
        return sum(int(t.numel() * t.element_size()) for t in (getattr(w, a) for a in parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, linear_nf4 = _nf4()
        out = linear_nf4(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def __deepcopy__(self, memo: dict[int, Any]) -> NF4Linear:
        # The frozen 4-bit weight is shared, not copied: torchao's NF4 copy re-quantises with its
        # default block sizes, which fails for weights quantised with other ones.
        bias = None if self.bias is None else self.bias.detach().clone()
        out = NF4Linear(self.weight.data, bias, settings=self.settings, source_hash=self.source_hash)
        memo[id(self)] = out
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the 4-bit one stands for, in the original dtype."""
        out: torch.Tensor = self.weight.get_original_weight()  # type: ignore[attr-defined]
        return out

    def dequantize(self) -> nn.Linear:
        """A plain float ``nn.Linear`` with the dequantised weight."""
        weight = self.dequantized_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=nf4"


def nf4_bytes(numel: int, block_size: int = 64, scaler_block_size: int | None = None) -> int:
    """The bytes :meth:`NF4Linear.storage_bytes` gives for a weight of ``numel`` values (for
    estimates: no tensor needed)."""
    scalers = scaler_blocks(numel, block_size, scaler_block_size, f"a weight of {numel} values")
    blocks = numel // block_size
    return numel // 2 + blocks + 4 * (blocks // scalers) + 4 + 4 * 16


def nf4_roundtrip(
    weight: torch.Tensor, block_size: int = 64, scaler_block_size: int | None = None
) -> torch.Tensor:
    """``dequant(nf4(weight))``: what a 4-bit base computes with instead of ``weight``."""
    to_nf4, _ = _nf4()
    scalers = scaler_blocks(weight.numel(), block_size, scaler_block_size, f"a {tuple(weight.shape)} weight")
    out: torch.Tensor = to_nf4(weight.detach(), block_size, scalers).get_original_weight()  # type: ignore[attr-defined]
    return out


def _check_adapters_take_4_bits(att: Attachment, wrapper: Adapted, path: str) -> None:
    """Refuse to quantise the base of a module whose adapter needs the float weight (Delta-LoRA
    updates it, DoRA normalises it, ...): inject refuses that order, so quantize refuses the other."""
    for name in wrapper.adapters:
        info = att.adapters[name]
        spec = hooks(info.method)
        if path in info.targets and not spec.quantized_base:
            raise ValueError(
                f"quantize: {path!r} carries adapter {name!r} ({type(info.method).__name__}); "
                f"{float_weight_reason(info.method)}: quantise only modules without it (targets=...), "
                "or use LoRA (QLoRA) on a quantised base"
            )


def _residual_layers(wrapper: Adapted, path: str) -> list[LoRALayer]:
    """The wrapper's LoRA layers that hold a frozen part taken out of the weight (the PiSSA family of
    initialisers): QPiSSA quantises what remains of the weight once that part is taken out."""
    layers = [
        layer
        for layer in wrapper.adapters.values()
        if isinstance(layer, LoRALayer) and layer.frozen_A is not None
    ]
    if layers and len(wrapper.adapters) > 1:
        raise ValueError(
            f"quantize: {path!r} has several adapters and one of them ({type(layers[0]).__name__}) "
            "takes its factors out of the weight; the residual of which one should be quantised? "
            "Quantise with that adapter alone"
        )
    return layers


def qpissa_factors(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    *,
    iterations: int,
    block_size: int = 64,
    scaler_block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QPiSSA: returns (residual to quantise, A, B) after ``iterations`` rounds (1 = plain QPiSSA).

    Round t > 1 refits the rank-r factors to the error the quantised residual leaves:
    ``s·B A = SVD_r(W − dequant(nf4(W − s·B A)))``.
    """
    rank = A.shape[0]
    W = weight.float()
    for _ in range(iterations - 1):
        kept = nf4_roundtrip(W - scale * (B @ A), block_size, scaler_block_size).float()
        U, S, Vh = torch.linalg.svd(W - kept, full_matrices=False)
        A, B = split_components(U[:, :rank], S[:rank], Vh[:rank], scale)
    return W - scale * (B @ A), A, B


def quantize(
    model: nn.Module,
    targets: TargetSpec = ALL_LINEAR,
    *,
    iterations: int = 1,
    block_size: int = 64,
    scaler_block_size: int | None = None,
) -> list[str]:
    """Store the frozen weights of the target linear layers in NF4, in place.

    * A plain ``nn.Linear`` (also the base of a LoRA-adapted module) becomes :class:`NF4Linear`
      (QLoRA: inject LoRA before or after).
    * The base of a module whose adapter was initialised from the weight (PiSSA, MiLoRA, CorDA) is
      replaced by the NF4 *residual* ``W − s·B A``, and the adapter drops its frozen copy (QPiSSA);
      ``iterations`` > 1 refits the factors to the quantisation error first.

    Args:
        targets: which modules (as in :func:`deltatune.inject`); default all linear layers but heads.
        iterations: QPiSSA refinement rounds T (1: no refit).
        block_size, scaler_block_size: NF4 block sizes (QLoRA: 64 and 256; None: see
            :func:`scaler_blocks`).

    Returns:
        The paths of the modules that were quantised.

    Raises:
        ValueError: torchao missing, a target that is not a float linear layer, a weight whose size
            does not split into blocks, a PiSSA-initialised adapter that has already trained (its
            residual would no longer be the one it was initialised from).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"quantize: iterations must be an integer >= 1, got {iterations!r}")
    att = attachment_of(model) if has_adapters(model) else None
    plan = _quantize_plan(model, att, targets, iterations, block_size, scaler_block_size)
    # Every quantised module (and QPiSSA's refitted factors) is computed before the first change.
    built = [_quantized(item, iterations, block_size, scaler_block_size) for item in plan]
    _put_in_place(model, att, built)
    return [p for p, *_ in plan]


#: (path, module, its wrapper if adapted, the adapter layer whose residual is quantised if any)
_Planned = tuple[str, nn.Linear, "Adapted | None", Any]
_Factors = tuple[torch.Tensor, torch.Tensor]
#: (path, wrapper, layer, QPiSSA's refitted factors if any, the quantised module)
_Built = tuple[str, "Adapted | None", Any, "_Factors | None", "NF4Linear"]


def _quantize_plan(
    model: nn.Module,
    att: Attachment | None,
    targets: TargetSpec,
    iterations: int,
    block_size: int,
    scaler_block_size: int | None,
) -> list[_Planned]:
    """:func:`quantize`'s checks, all before any change: the modules ``targets`` selects, each a float
    ``nn.Linear`` whose size splits into blocks, under adapters that take a 4-bit base, and the
    weight-initialised adapters (QPiSSA) among them untrained since."""
    modules = base_modules(model, att)
    plan: list[_Planned] = []
    for path in resolve(model, targets, modules):
        module = modules[path]
        if getattr(module, "quantized", False):
            raise ValueError(f"quantize: {path!r} is already quantised")
        if type(module) is not nn.Linear:
            raise ValueError(
                f"quantize: {path!r} is {type(module).__name__}; only nn.Linear weights are quantised"
            )
        scaler_blocks(module.weight.numel(), block_size, scaler_block_size, repr(path))
        wrapper = att.wrappers.get(path) if att is not None else None
        if wrapper is not None and att is not None:
            _check_adapters_take_4_bits(att, wrapper, path)
        residual = _residual_layers(wrapper, path) if wrapper is not None else []
        for layer in residual:
            assert layer.frozen_A is not None and layer.frozen_B is not None  # (why it was chosen)
            if not (torch.equal(layer.lora_A, layer.frozen_A) and torch.equal(layer.lora_B, layer.frozen_B)):
                raise ValueError(
                    f"quantize: the adapter on {path!r} has trained since it was initialised from the "
                    "weight; quantise right after inject (QPiSSA quantises the initial residual)"
                )
        plan.append((path, module, wrapper, residual[0] if residual else None))
    if iterations > 1 and not any(layer is not None for *_, layer in plan):
        raise ValueError(
            f"quantize: iterations={iterations} refits an adapter initialised from the weight (PiSSA, "
            "MiLoRA, CorDA: QPiSSA), but none of the modules to quantise carries one; inject such an "
            "adapter first, or pass iterations=1 (QLoRA)"
        )
    return plan


def _quantized(item: _Planned, iterations: int, block_size: int, scaler_block_size: int | None) -> _Built:
    """One planned module quantised: its weight in NF4 (QPiSSA: the residual, with the refitted
    factors), nothing changed yet."""
    path, module, wrapper, layer = item
    weight = module.weight.detach()
    factors = None
    if layer is not None:
        assert layer.frozen_A is not None and layer.frozen_B is not None
        W_res, A, B = qpissa_factors(
            weight,
            layer.frozen_A,
            layer.frozen_B,
            layer.scale,
            iterations=iterations,
            block_size=block_size,
            scaler_block_size=scaler_block_size,
        )
        factors = (A.to(layer.lora_A.dtype), B.to(layer.lora_B.dtype))
        weight = W_res.to(weight.dtype)
    new = NF4Linear.from_weight(
        weight,
        module.bias,
        block_size=block_size,
        scaler_block_size=scaler_block_size,
        iterations=iterations if layer is not None else None,
        source=module.weight,
    )
    return path, wrapper, layer, factors, new


def _put_in_place(model: nn.Module, att: Attachment | None, built: list[_Built]) -> None:
    """The quantised modules into the model, all or none; then QPiSSA's factors, relative to them."""
    with all_or_nothing(model):
        for path, wrapper, _, _, new in built:
            if wrapper is not None:
                wrapper.base = new
            else:
                set_submodule(model, path, new)
        # The in-place writes (which all_or_nothing cannot undo) come last.
        for path, wrapper, layer, factors, _ in built:
            if factors is None or wrapper is None or att is None:
                continue
            # From now on the adapter is relative to the quantised residual: it saves as its rank-r
            # factors (to reload: inject the same PiSSA config, quantize() with the same iterations,
            # then deltatune.runtime.state.load_adapter_state the saved tensors). _residual_layers
            # guarantees the layer is the wrapper's only adapter.
            info = att.adapters[next(iter(wrapper.adapters))]
            info.configs[path] = dataclasses.replace(cast(Any, info.configs[path]), save_mode="native")
            info.method = dataclasses.replace(cast(Any, info.method), save_mode="native")
            layer.set_factors(*factors, frozen_copy=False)
            layer.frozen_A = layer.frozen_B = None


def quantization_error(model_weight: torch.Tensor, module: nn.Module, delta: torch.Tensor | None) -> float:
    """``‖W − (dequant(W4) + ΔW)‖_F / ‖W‖_F`` for a quantised module and its adapter's ΔW."""
    if not isinstance(module, NF4Linear):
        raise ValueError(f"quantization_error: expected an NF4Linear, got {type(module).__name__}")
    approx = module.dequantized_weight().float()
    if delta is not None:
        approx = approx + delta.float()
    W = model_weight.float()
    return float((W - approx).norm() / W.norm())


__all__ = [
    "FORMATS",
    "NF4Linear",
    "NF4Settings",
    "nf4_bytes",
    "nf4_roundtrip",
    "qpissa_factors",
    "quantization_error",
    "quantize",
]
