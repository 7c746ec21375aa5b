"""Optimizer parameter groups, with LoRA+ (Hayou et al. 2024, arXiv:2402.12354) as an option.

LoRA+ trains B with a learning rate ``ratio`` times A's (the paper's default ratio: 16). The groups
are those of PEFT's ``peft.optimizers.create_loraplus_optimizer``, in its order, for any optimizer:

* ``"A"``: every other trainable parameter of two or more dimensions (A factors, full copies'
  weights), at ``lr`` with ``weight_decay``;
* ``"embedding"``: every trainable parameter of an adapter layer on an embedding, at ``embedding_lr``
  (PEFT's default 1e-6) with ``weight_decay``;
* ``"B"``: ``lora_B`` factors and one-dimensional parameters, at ``lr · ratio`` with ``weight_decay``;
* ``"B_no_decay"``: those of them that are biases or sit in a LayerNorm, at ``lr · ratio`` without.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> net = nn.Sequential(nn.Linear(8, 8))
    >>> _ = dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    >>> groups = dt.parameter_groups(net, 1e-4, loraplus_ratio=16)
    >>> [(g["name"], len(g["params"]), g["lr"]) for g in groups]
    [('A', 1, 0.0001), ('embedding', 0, 1e-06), ('B', 1, 0.0016), ('B_no_decay', 0, 0.0016)]
    >>> optimizer = torch.optim.AdamW(groups)
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["parameter_groups"]


def _positive(value: object, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def parameter_groups(
    model: nn.Module,
    lr: float,
    *,
    loraplus_ratio: float | None = None,
    embedding_lr: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of ``model``'s trainable parameters.

    Args:
        model: a model with adapters (or any module); only parameters with ``requires_grad`` count.
        lr: the base learning rate (A's under LoRA+).
        loraplus_ratio: LoRA+'s ratio of B's learning rate to A's (the paper suggests 16); None: one
            group ``"trainable"`` at ``lr``.
        embedding_lr: LoRA+: the learning rate of adapters on embeddings (PEFT's default 1e-6).
        weight_decay: LoRA+: the weight decay of every group but ``"B_no_decay"``.

    Returns:
        A list of ``{"params", "lr", "weight_decay", "name"}`` dicts for ``torch.optim`` optimizers.
    """
    lr = _positive(lr, "parameter_groups: lr")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if loraplus_ratio is None:
        return [
            {"params": [p for _, p in trainable], "lr": lr, "weight_decay": weight_decay, "name": "trainable"}
        ]
    ratio = _positive(loraplus_ratio, "parameter_groups: loraplus_ratio (LoRA+: B's lr / A's lr)")
    embedding_lr = _positive(embedding_lr, "parameter_groups: embedding_lr")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"parameter_groups: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    in_norm = {
        f"{m}.{n}" if m else n
        for m, module in model.named_modules()
        if isinstance(module, nn.LayerNorm)
        for n, _ in module.named_parameters()
    }
    names: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in trainable:
        owner = model.get_submodule(name.rpartition(".")[0])
        if getattr(owner, "kind", None) == "embedding":  # an adapter layer on an embedding (LoRA's)
            names["embedding"].append(p)
        elif name.rpartition(".")[2] == "lora_B" or p.ndim == 1:
            names["B" if name not in in_norm and "bias" not in name else "B_no_decay"].append(p)
        else:
            names["A"].append(p)
    rates = {"A": lr, "embedding": embedding_lr, "B": lr * ratio, "B_no_decay": lr * ratio}
    return [
        {
            "params": params,
            "lr": rates[group],
            "weight_decay": 0.0 if group == "B_no_decay" else weight_decay,
            "name": group,
        }
        for group, params in names.items()
    ]
