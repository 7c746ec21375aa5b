"""BitFit: Ben Zaken, Ravfogel and Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", arXiv:2106.10199.

Only the bias terms train:

    y = W x + (b + Δb),    Δb = 0 at init,    merged: b' = b + Δb

The base bias stays untouched; the trainable Δb lives in the adapter (so disabling, unloading,
saving and switching work as for every other method) and folds exactly into the bias on merge.
``subset="query_ffn"`` is the paper's smaller variant (§4.2): only the query and the FFN-intermediate
(FFN input) biases. Default targets (:mod:`deltatune.anatomy`): every linear layer of every block
(``"all"``), or the query and FFN input projections (``"query_ffn"``). The paper also trains the
LayerNorm biases; here BitFit adapts the biases of linear layers (and GPT-2's Conv1D) only.
A target without a bias (Llama's projections) is an error, never a silent no-op.

Closed forms, per adapted module with out_features n:

    trainable = stored = n          stored bytes = 4 · n   (float32)

Example:
    >>> from torch import nn
    >>> from deltatune import inject
    >>> net = nn.Sequential(nn.Linear(16, 8))
    >>> inject(net, BitFit(), targets=["0"]).closed_form("default")
    (8, 32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ... import anatomy
from ...contract import AdditiveLayer, Method, Suite, register, shallow_copy
from ...contract.fields import OneOf, param
from ...targets import module_kind, shape_of


def _bias_dtype(base: nn.Module) -> torch.dtype:
    bias = getattr(base, "bias", None)
    dtype = bias.dtype if isinstance(bias, torch.Tensor) else torch.float32
    return torch.promote_types(dtype, torch.float32)


@register
@dataclass(frozen=True, kw_only=True)
class BitFit(Method):
    """Train only bias terms, as an additive Δb per adapted linear layer.

    Fields (paper defaults in brackets):
        subset: "all" biases of the blocks' linear layers, or "query_ffn": only the query and
            FFN-intermediate biases (the paper's smaller variant) ["all"]. With explicit targets,
            "query_ffn" refuses targets that are not query or FFN input projections.
    """

    subset: str = param("all", OneOf(("all", "query_ffn")), "which biases train: all, or query and FFN input")

    name: ClassVar[str] = "bitfit"

    def default_lr(self) -> float:
        """9e-3: biases alone move the model little per step; chosen on SST-2's validation split (MiniLM,
        every linear layer's bias, 150 steps: benchmarks/README.md, "Each method at its own learning
        rate"): 80.9 at 9e-3, 80.7 at 3e-2, 79.5 at 3e-3."""
        return 9e-3

    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    layer_types: ClassVar[tuple[str, ...]] = ("linear", "conv1d")
    suite: ClassVar[Suite] = Suite(
        example={},
        random_init=False,  # Δb starts at zero whatever the seed
    )

    def accepts(self, module: nn.Module) -> bool:
        """Whether BitFit can adapt ``module``: a linear layer that has a bias."""
        has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
        return has_bias and module_kind(module) in self.layer_types

    def default_targets(self, model: nn.Module) -> list[str]:
        """The blocks' linear layers that have a bias (all, or the query and FFN input projections).

        Raises:
            ValueError: none of them has a bias (Llama), naming the model and one such module.
        """
        parts = anatomy.describe(model)
        if self.subset == "query_ffn":
            paths = parts.paths("query", "ffn_input")
        else:
            paths = [
                path
                for block in parts.blocks
                for path, m in anatomy.named_modules(model.get_submodule(block), prefix=block)
                if path != block and module_kind(m) in self.layer_types
            ]
        modules = dict(anatomy.named_modules(model))
        with_bias = [p for p in paths if self.accepts(modules[p])]
        if not with_bias:
            raise ValueError(
                f"BitFit: no targeted linear layer of {type(model).__name__} has a bias (e.g. {paths[0]!r}); "
                "BitFit trains existing bias terms only: use another method (e.g. LoRA)"
            )
        return with_bias

    def check_targets(self, model: nn.Module, paths: list[str]) -> None:
        if self.subset == "all":
            return
        allowed = set(self.default_targets(model))
        wrong = [p for p in paths if p not in allowed]
        if wrong:
            raise ValueError(
                f"BitFit.subset='query_ffn' trains only query and FFN-input biases; {wrong[:4]} are "
                "neither: give no targets, or use subset='all'"
            )

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> BitFitLayer:
        if not isinstance(getattr(base, "bias", None), torch.Tensor):
            raise ValueError(
                f"BitFit: {path!r} ({type(base).__name__}) has no bias; BitFit trains existing bias terms "
                "only: leave this module out of the targets, or use another method (e.g. LoRA)"
            )
        return BitFitLayer(shape_of(base)[1], _bias_dtype(base))

    def parameter_count(self, base: nn.Module) -> int:
        return shape_of(base)[1]

    def stored_bytes(self, base: nn.Module) -> int:
        return self.parameter_count(base) * _bias_dtype(base).itemsize


class BitFitLayer(AdditiveLayer):
    """Δb of one layer: added to the base output, folded into the bias on merge."""

    def __init__(self, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))  # Δb

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Δb broadcast to the output's shape (..., out): per example, so route() can mix adapters."""
        return self.bias.expand(*x.shape[:-1], self.bias.shape[0])

    def merged(self, base: nn.Module) -> nn.Module:
        """A plain copy of ``base`` whose bias is b + Δb (added in float32)."""
        bias = base.bias
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"BitFit: cannot merge into {type(base).__name__}: it has no bias")
        new = shallow_copy(base)
        summed = bias.detach().float() + self.bias.detach().float().to(bias.device)
        new.bias = nn.Parameter(summed.to(bias.dtype), requires_grad=False)
        return new
