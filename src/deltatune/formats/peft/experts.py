"""PEFT's LoRA on bare parameters (``target_parameters``, its ``ParamWrapper``): the fused MoE experts.

PEFT adapts a 3-D expert weight ``(experts, ·, ·)`` with ``lora_A.weight`` of shape ``(r · experts,
in)`` (expert ``e``'s ``A`` in rows ``e·r … e·r + r - 1``) and ``lora_B.weight`` of shape ``(out, r ·
experts)`` (expert ``e``'s ``B`` in columns ``e, e + experts, …``); ``in`` and ``out`` are the weight's
true fan-in and fan-out, whether it is stored ``(experts, out, in)`` or, ``is_transposed``,
``(experts, in, out)``. Several weights of one module nest one wrapper per weight, the module's first
weight innermost, so its keys carry one ``base_layer.`` per weight adapted after it:
``experts.base_layer.lora_A.weight`` is ``gate_up_proj``'s, ``experts.lora_A.weight``
``down_proj``'s. deltatune keeps ``A`` as ``(experts, r, in)`` and ``B`` as ``(experts, out, r)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...runtime.wrapper import ATTACHMENT_ATTR, Attachment, base_modules
from ...targets import expert_weights, module_kind, name_matches

_KEY = re.compile(r"^(?P<owner>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<factor>[AB])\.weight$")


def from_peft(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], model: nn.Module, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, ...]], dict[str, torch.Tensor]]:
    """The tensors of ``target_parameters`` in a PEFT LoRA file, taken out of ``tensors``:
    ``(the other tensors, owner path -> the expert weights adapted, deltatune's state)``; an owner
    whose every expert weight is adapted maps to ``()``, as :func:`deltatune.targets.resolve_targets`
    leaves such a module out of its selection."""
    given = config.get("target_parameters") or []
    given = [given] if isinstance(given, str) else list(given)
    if not given:
        return dict(tensors), {}, {}
    modules = base_modules(model, model.__dict__.get(ATTACHMENT_ATTR))
    found: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        match = _KEY.match(key[len(prefix) :]) if key.startswith(prefix) else None
        owner = match["owner"] if match else None
        if match is None or owner not in modules or module_kind(modules[owner]) != "experts":
            rest[key] = value
            continue
        depth = match["nest"].count(".base_layer")
        found.setdefault(owner, {})[(depth, match["factor"])] = value
    if not found:
        raise ValueError(
            f"target_parameters is {given}, but the file holds no LoRA tensors of fused experts that "
            "this model has (transformers' MoE experts modules)"
        )
    chosen: dict[str, tuple[str, ...]] = {}
    state: dict[str, torch.Tensor] = {}
    for owner, parts in found.items():
        module = modules[owner]
        names = tuple(
            w
            for w in expert_weights(module)
            if any(name_matches(f"{owner}.{w}", t) or re.fullmatch(t, f"{owner}.{w}") for t in given)
        )
        depths = sorted({d for d, _ in parts})
        if depths != list(range(len(names))) or len(parts) != 2 * len(names):
            raise ValueError(
                f"{owner!r}: target_parameters {given} select its weights {list(names)}, but the file "
                f"holds LoRA tensors for {len(depths)} nested weight(s) ({sorted(parts)})"
            )
        for k, weight in enumerate(names):
            A, B = parts[(len(names) - 1 - k, "A")], parts[(len(names) - 1 - k, "B")]
            state.update(_ours(owner, weight, module, A, B))
        chosen[owner] = () if names == expert_weights(module) else names
    return rest, chosen, state


def _ours(
    owner: str, weight: str, module: nn.Module, A: torch.Tensor, B: torch.Tensor
) -> dict[str, torch.Tensor]:
    """PEFT's ``(r·experts, in)`` and ``(out, r·experts)`` as ours, ``(experts, r, in)`` and
    ``(experts, out, r)``."""
    param = module._parameters[weight]
    assert param is not None
    experts, d1, d2 = param.shape
    fan_in, fan_out = (d1, d2) if module.is_transposed else (d2, d1)
    rows = A.shape[0]
    if A.ndim != 2 or B.ndim != 2 or rows % experts:
        raise ValueError(f"{owner}.{weight}: PEFT's factors must be 2-D with r·{experts} rows of A")
    r = rows // experts
    old = not module.is_transposed and fan_in != fan_out
    if old and A.shape[1] == fan_out and tuple(B.shape) == (fan_in, rows):
        # PEFT before its in/out swap (0.18) took an (experts, out, in) weight's dim 1 as "in": its
        # update of expert e is (B_e A_e)ᵀ = A_eᵀ B_eᵀ, so our A_e is its B_eᵀ, our B_e its A_eᵀ
        return {
            f"{owner}.factors.{weight}.lora_A": B.t()
            .reshape(r, experts, fan_in)
            .permute(1, 0, 2)
            .contiguous(),
            f"{owner}.factors.{weight}.lora_B": A.reshape(experts, r, fan_out).permute(0, 2, 1).contiguous(),
        }
    if A.shape[1] != fan_in or B.shape != (fan_out, rows):
        raise ValueError(
            f"{owner}.{weight} {tuple(param.shape)}: PEFT's factors must be (r·{experts}, {fan_in}) and "
            f"({fan_out}, r·{experts}); the file holds {tuple(A.shape)} and {tuple(B.shape)}"
        )
    return {
        f"{owner}.factors.{weight}.lora_A": A.reshape(experts, r, fan_in),
        f"{owner}.factors.{weight}.lora_B": B.reshape(fan_out, r, experts).permute(2, 0, 1).contiguous(),
    }


def to_peft(
    attachment: Attachment, name: str, state: Mapping[str, torch.Tensor], prefix: str
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``(target_parameters, tensors)`` of adapter ``name``'s expert weights, under PEFT's names
    (a shared factor is written once per expert: PEFT has none)."""
    info = attachment.info(name)
    targets: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for path in info.targets:
        base = attachment.wrappers[path].base
        if module_kind(base) != "experts":
            continue
        layer = attachment.wrappers[path].adapters[name]
        names = [w for w in expert_weights(base) if f"{path}.factors.{w}.lora_A" in state]
        if not isinstance(getattr(layer, "dropout", None), nn.Identity):
            raise ValueError(
                f"{path!r}: PEFT's LoRA on parameters refuses lora_dropout > 0; this adapter has some"
            )
        for k, weight in enumerate(names):
            A, B = state[f"{path}.factors.{weight}.lora_A"], state[f"{path}.factors.{weight}.lora_B"]
            experts = int(base._parameters[weight].shape[0])  # type: ignore[union-attr]
            A, B = A.expand(experts, -1, -1), B.expand(experts, -1, -1)
            nest = ".base_layer" * (len(names) - 1 - k)
            tensors[f"{prefix}{path}{nest}.lora_A.weight"] = A.reshape(-1, A.shape[-1]).contiguous()
            tensors[f"{prefix}{path}{nest}.lora_B.weight"] = (
                B.permute(1, 2, 0).reshape(B.shape[1], -1).contiguous()
            )
            targets.append(f"{path}.{weight}")
    return targets, tensors
