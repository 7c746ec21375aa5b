"""What trains: the method applied to the model (where, with which fields), as optimizer groups.

:func:`prepare` applies ``cfg.method`` at ``cfg.targets``, else at :func:`harness_targets` (the
library's rule for a run without targets, with the harness's fallback), lets the method fit the
fields the user left at their defaults to the model, and returns AdamW parameter groups: adapter,
head, and any groups the method declares with ``parameter_groups``. ``"full"`` and ``"head"`` train
every parameter, or the task head alone.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import contract
from ..runtime import core
from ..runtime.loraplus import parameter_groups
from ..targets import (
    ALL_LINEAR,
    HEAD_NAMES,
    QUERY_VALUE,
    TargetSpec,
    default_targets,
    query_value_names,
    resolve,
)
from .config import FULL, HEAD_ONLY, TrainConfig
from .tasks import Task

__all__ = ["harness_targets", "head_paths", "prepare"]


def harness_targets(method: contract.Method, model: nn.Module) -> TargetSpec:
    """Where ``deltatune train`` puts ``method`` on ``model`` when no targets are given: the rule of
    :func:`deltatune.targets.default_targets`, with the harness's fallback: ``"query-value"`` where
    the model has those projections, else ``"all-linear"``."""
    fallback = QUERY_VALUE if query_value_names(p for p, _ in model.named_modules()) else ALL_LINEAR
    return default_targets(contract.hooks(method), model, fallback)


def head_paths(model: nn.Module) -> list[str]:
    """The task heads among the model's children (a classifier, a regression score; not ``lm_head``)."""
    return [name for name, _ in model.named_children() if name in HEAD_NAMES and name != "lm_head"]


def loraplus_groups(
    model: nn.Module, cfg: TrainConfig, head_ids: set[int], method_declares_groups: bool
) -> list[dict[str, Any]]:
    """LoRA+'s groups (:func:`deltatune.parameter_groups`) of the adapter's parameters; the head apart.

    The head (trained in full, at ``head_lr``) is not part of LoRA+'s split. A method that declares its
    own groups, or one without ``lora_B`` factors, is refused: LoRA+ would be silently meaningless.
    """
    if method_declares_groups:
        raise ValueError(
            f"TrainConfig.loraplus_ratio: method {cfg.method!r} declares its own parameter groups "
            "(learning-rate ratios of its own); drop loraplus_ratio or use those"
        )
    if not any(n.rpartition(".")[2] == "lora_B" for n, p in model.named_parameters() if p.requires_grad):
        raise ValueError(
            f"TrainConfig.loraplus_ratio: method {cfg.method!r} trains no lora_B factors; LoRA+ applies to "
            "LoRA-type adapters (lora, dora, lora_fa)"
        )
    groups = parameter_groups(
        model, cfg.peak_lr, loraplus_ratio=cfg.loraplus_ratio, weight_decay=cfg.weight_decay
    )
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in head_ids]
    return [g for g in groups if g["params"]]


def prepare(
    model: nn.Module, cfg: TrainConfig, task: Task, tokenizer: Any = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Apply the method; return optimizer parameter groups and facts for the report.

    The facts: ``trainable`` (a count), and for an adapter its ``targets`` and the fields ``fitted``
    to the model (those the user left at their defaults that the method's ``fit_to`` changed).
    """
    heads = head_paths(model) if task.kind != "generation" else []
    if cfg.method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
        head_ids = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
        body = [p for p in model.parameters() if id(p) not in head_ids]
        head = [p for p in model.parameters() if id(p) in head_ids]
        groups = [{"params": body, "lr": cfg.peak_lr, "name": "body"}]
        if head:
            groups.append({"params": head, "lr": cfg.head_rate, "name": "head"})
        return groups, {"trainable": sum(p.numel() for p in model.parameters())}
    if cfg.method == HEAD_ONLY:
        for p in model.parameters():
            p.requires_grad_(False)
        if not heads:
            raise ValueError(f"method 'head': model {cfg.model!r} has no task head (looked for {HEAD_NAMES})")
        head = [p for h in heads for p in model.get_submodule(h).parameters()]
        for p in head:
            p.requires_grad_(True)
        quantized = _quantize_base(model, cfg)
        return [{"params": head, "lr": cfg.head_rate, "name": "head"}], {
            "trainable": sum(p.numel() for p in head),
            **quantized,
        }
    method = contract.method_from_config(cfg.method, _token_fields(cfg, tokenizer))
    targets = cfg.targets or harness_targets(method, model)
    # A method may fit the fields the user left at their defaults to this model (its fit_to hook).
    chosen = contract.hooks(method).fit_to(
        {p: model.get_submodule(p) for p in resolve(model, targets)}, set(cfg.method_fields)
    )
    # ... and to the run's length (a method with a schedule of its own: AdaLoRA's budget, ReLoRA's
    # restarts), or refuses fields that do not fit it, naming them.
    chosen = contract.hooks(chosen).for_steps(cfg.steps, set(cfg.method_fields))
    before = contract.method_fields(method)
    fitted = {k: v for k, v in contract.method_fields(chosen).items() if v != before[k]}
    method = chosen
    saved = cfg.modules_to_save if cfg.modules_to_save is not None else heads
    att = core.inject(model, method, targets=targets, modules_to_save=saved, seed=cfg.seed)
    info = att.info("default")
    copy_ids = {id(p) for path in info.modules_to_save for p in att.layers("default")[path].parameters()}
    declared = contract.hooks(method).parameter_groups(att, "default")
    groups = []
    if cfg.loraplus_ratio is not None:
        groups = loraplus_groups(model, cfg, copy_ids, declared is not None)
    elif declared is not None:
        # A method may split its parameters into groups with their own learning-rate multipliers.
        for name, (params, scale) in declared.items():
            groups.append({"params": params, "lr": cfg.peak_lr * scale, "name": name})
    else:
        adapter = [p for p in info.trainable if id(p) not in copy_ids]
        groups.append({"params": adapter, "lr": cfg.peak_lr, "name": "adapter"})
    head = [p for p in info.trainable if id(p) in copy_ids]
    if head:
        groups.append({"params": head, "lr": cfg.head_rate, "name": "head"})
    facts = {"trainable": sum(p.numel() for p in info.trainable), "targets": list(info.targets)}
    return groups, {**facts, "fitted": fitted, **_quantize_base(model, cfg)}


def _token_fields(cfg: TrainConfig, tokenizer: Any) -> dict[str, Any]:
    """The method's fields, with ``token_ids`` of ``--method trainable_tokens`` read off the
    tokenizer (``--trainable-tokens``, else ``--add-tokens``) unless given."""
    tokens = cfg.trainable_tokens or cfg.add_tokens
    if cfg.method != "trainable_tokens" or "token_ids" in cfg.method_fields or not tokens:
        return cfg.method_fields
    if tokenizer is None:
        raise ValueError("--method trainable_tokens with tokens by name needs the model's tokenizer")
    found = tokenizer.convert_tokens_to_ids(list(tokens))
    unknown = [t for t, i in zip(tokens, found, strict=True) if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise ValueError(
            f"--trainable-tokens: the tokenizer has no token(s) {unknown}; add them with --add-tokens"
        )
    return {**cfg.method_fields, "token_ids": tuple(int(i) for i in found)}


def _quantize_base(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """``cfg.quantize``: every linear layer of the base but the heads in NF4, after the method is
    applied (QLoRA; an adapter initialised from the weight keeps its part in float and the base
    holds the 4-bit residual, refitted ``cfg.quantize_iterations`` times: QPiSSA). The fact for
    the report: how many modules, and the bytes of the model's weights before."""
    if cfg.quantize is None:
        return {}
    from ..runtime.quant import quantize  # torchao: the quant extra
    from ..runtime.quantized_base import compact, weight_bytes

    before = weight_bytes(model)
    paths = quantize(model, iterations=cfg.quantize_iterations)
    compact(model)  # the float weights' memory back (on the CPU)
    return {"quantized": {"format": cfg.quantize, "modules": len(paths), "weight_bytes_before": before}}
