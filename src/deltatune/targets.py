"""Choosing which modules to adapt: by name, suffix, regex, module type or layer index.

A target specification is any of

* ``"all-linear"``: every linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) except the output head;
* ``"query-value"``: the attention query and value projections, by the names common models give
  them (:data:`QUERY_VALUE_NAMES`);
* a string: an exact module path (``"encoder.layer.0.attention.self.query"``) or a dotted suffix of
  one (``"query"``, ``"self.query"``); it also selects the weights of fused MoE experts by their
  names (``"experts.gate_up_proj"``, ``"down_proj"``): the experts module is adapted, on those
  weights only (:func:`resolve_targets`);
* a compiled regex (``re.compile(r".*\\.(query|value)")``): matched against the whole path (of a
  module, or of an expert weight);
* a module class (``nn.Linear``): every module of that class;
* a :class:`Target`: several constraints that must all hold (e.g. names *and* layer indices);
* a list of the above: the union.

Example:
    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> resolve(net, ["0"])
    ['0']
    >>> resolve(net, Target(types=(nn.Linear,), layers=(2,)))
    ['2']
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, Union

import torch
from torch import nn

ALL_LINEAR = "all-linear"
QUERY_VALUE = "query-value"
#: The attention query and value projections, by the names common models give them (BERT, Llama,
#: GPT-2's fused ``c_attn``, T5): :data:`QUERY_VALUE` takes the first of these a model has.
QUERY_VALUE_NAMES = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",), ("q", "v"))

# Names under which transformers models keep their output heads; "all-linear" leaves these out.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "output_projection")


@dataclass(frozen=True)
class Target:
    """A conjunction of constraints on a module path.

    Args:
        names: exact paths or dotted suffixes (any of them).
        pattern: a regex that must match the whole path.
        types: module classes (any of them).
        layers: layer indices: the first integer component of the path (``encoder.layer.3.x`` -> 3).
        exclude: exact paths or suffixes to leave out.
    """

    names: tuple[str, ...] = ()
    pattern: str | None = None
    types: tuple[type, ...] = ()
    layers: tuple[int, ...] = ()
    exclude: tuple[str, ...] = ()


TargetSpec = Union[
    str, "re.Pattern[str]", type, Target, Sequence[Union[str, "re.Pattern[str]", type, Target]]
]


class Placed(Protocol):
    """A method config's placement hook (every registered method has one, see :mod:`deltatune.contract`)."""

    def default_targets(self, model: nn.Module) -> TargetSpec | None: ...


def default_targets(method: Placed, model: nn.Module, fallback: TargetSpec = ALL_LINEAR) -> TargetSpec:
    """Where ``method`` goes on ``model`` when no targets are given: the one rule.

    The method's own placement where it declares one (its ``default_targets(model)`` hook: adapters
    after the attention and FFN outputs, prompt tuning on the transformer body, BitFit's biases, ...),
    else the caller's ``fallback``: :func:`deltatune.inject` falls back to ``"all-linear"``;
    ``deltatune train`` to ``"query-value"`` where the model has those projections (LoRA's setting,
    Hu et al. 2021, §7.1, on which the README's and the benchmarks' harness runs were measured), else
    ``"all-linear"`` (:func:`deltatune.train.prepare.harness_targets`).
    """
    declared = method.default_targets(model)
    return fallback if declared is None else declared


def query_value_names(modules: Iterable[str]) -> tuple[str, ...] | None:
    """The first pair of :data:`QUERY_VALUE_NAMES` whose names all end some of the module paths
    ``modules``; None where the model has none of them."""
    leaves = {p.split(".")[-1] for p in modules}
    return next((names for names in QUERY_VALUE_NAMES if all(n in leaves for n in names)), None)


#: The 3-D weights of transformers' fused experts, by the names its ``use_experts_implementation``
#: contract gives them: ``gate_up_proj`` (gate and up fused) or ``up_proj``, then ``down_proj``.
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def expert_weights(module: nn.Module) -> tuple[str, ...]:
    """The names of the 3-D weights of a fused-experts module (``("gate_up_proj", "down_proj")`` for
    Mixtral), or ``()`` when ``module`` is not one whose layout deltatune understands: transformers'
    experts modules declare it (``is_transposed``, ``_apply_gate`` and, from transformers 5.2 on,
    ``has_gate``: set by ``transformers.integrations.moe.use_experts_implementation``), each weight
    ``(experts, out, in)`` or, transposed, ``(experts, in, out)``."""
    if not hasattr(module, "is_transposed") or not callable(getattr(module, "_apply_gate", None)):
        return ()
    names = ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", "down_proj")
    weights = [module._parameters.get(name) for name in names]
    if not all(isinstance(w, torch.Tensor) and w.ndim == 3 for w in weights):
        return ()
    if len({w.shape[0] for w in weights if w is not None}) != 1:
        return ()
    return names


def module_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` (GPT-2's transposed linear), ``"embedding"``, ``"experts"``
    (transformers' fused experts, :func:`expert_weights`), ``"block"`` or None.

    A ``"block"`` is a callable module made of submodules that holds parameters (a transformer
    block, an MLP, an attention layer); containers that are not called (``nn.ModuleList``,
    ``nn.ModuleDict``) are not blocks.
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_conv1d(module):
        return "conv1d"
    if expert_weights(module):
        return "experts"
    if is_block(module):
        return "block"
    return None


def is_block(module: nn.Module) -> bool:
    """True for a module with child modules and parameters that is called (not a ModuleList/Dict)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
        return False
    return next(module.children(), None) is not None and next(module.parameters(), None) is not None


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 ``Conv1D`` (weight stored as (in, out))."""
    # transformers is only imported when the model already uses it.
    tf = sys.modules.get("transformers.pytorch_utils")
    if tf is not None and isinstance(module, tf.Conv1D):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def shape_of(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module; (num_embeddings, dim) of an embedding."""
    kind = module_kind(module)
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no weight tensor")
    if kind == "linear":
        return int(weight.shape[1]), int(weight.shape[0])
    if kind in ("conv1d", "embedding"):
        return int(weight.shape[0]), int(weight.shape[1])
    raise ValueError(f"{type(module).__name__} is not a linear, Conv1D or embedding module")


def layer_index(path: str) -> int | None:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def name_matches(path: str, name: str) -> bool:
    """``name`` is ``path`` itself or a dotted suffix of it (``"query"`` matches ``"...self.query"``)."""
    return path == name or path.endswith("." + name)


def pattern_matches(path: str, pattern: str) -> bool:
    """An override key: an exact path, a dotted suffix, or a regex matched against the whole path."""
    return name_matches(path, pattern) or re.fullmatch(pattern, path) is not None


def _head_paths(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            heads.update(p for p, m in modules.items() if m is out)
    for path in modules:
        top = path.split(".")[0]
        if top in HEAD_NAMES:
            heads.add(path)
    return heads


def _matches(path: str, module: nn.Module, spec: object, heads: set[str]) -> bool:
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            return module_kind(module) in ("linear", "conv1d") and path not in heads
        return name_matches(path, spec)
    if isinstance(spec, re.Pattern):
        return spec.fullmatch(path) is not None
    if isinstance(spec, type):
        return isinstance(module, spec)
    if isinstance(spec, Target):
        if spec.names and not any(name_matches(path, n) for n in spec.names):
            return False
        if spec.pattern is not None and re.fullmatch(spec.pattern, path) is None:
            return False
        if spec.types and not isinstance(module, spec.types):
            return False
        if spec.layers and layer_index(path) not in spec.layers:
            return False
        return not any(name_matches(path, n) for n in spec.exclude)
    raise ValueError(f"targets: cannot use {spec!r} ({type(spec).__name__}); {_TARGETS_ARE}")


_TARGETS_ARE = (
    "targets may be a module name or dotted suffix (str), a regex (re.compile(...)), a module class, "
    "a Target, 'all-linear', 'query-value', or a list of these"
)


def _as_list(spec: TargetSpec) -> list[object]:
    if isinstance(spec, (str, re.Pattern, type, Target)):
        return [spec]
    if isinstance(spec, Iterable):
        items: list[object] = list(spec)
        if not items:
            raise ValueError("targets must name at least one module, got an empty list")
        return items
    raise ValueError(f"targets: cannot use {spec!r} ({type(spec).__name__}); {_TARGETS_ARE}")


def resolve(
    model: nn.Module,
    spec: TargetSpec,
    modules: dict[str, nn.Module] | None = None,
) -> list[str]:
    """Paths of the modules that ``spec`` selects, in model order.

    Raises:
        ValueError: if one of the specs matches nothing; the message lists the closest names.
    """
    return resolve_targets(model, spec, modules)[0]


def resolve_targets(
    model: nn.Module,
    spec: TargetSpec,
    modules: dict[str, nn.Module] | None = None,
) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """:func:`resolve`'s paths, and the fused-experts modules among them that ``spec`` selects by the
    names of their weights alone (``"experts.gate_up_proj"``, a suffix of
    ``"model.layers.0.mlp.experts.gate_up_proj"``, or a regex over such paths), each with the weights
    selected, in the module's order. A module that an item also selects as a whole (``"experts"``),
    or whose every weight is named, is not in the second: all its weights are adapted.

    Raises:
        ValueError: one of the specs matches nothing (the message lists the closest names), or names
            a 3-D parameter of a module whose layout is not understood.
    """
    if modules is None:
        modules = dict(model.named_modules())
    modules = {p: m for p, m in modules.items() if p}
    heads = _head_paths(model, modules)
    whole: set[str] = set()
    by_weight: dict[str, set[str]] = {}
    for item in _named_sets(_as_list(spec), modules):
        hits = {p for p, m in modules.items() if _matches(p, m, item, heads)}
        weights = _parameter_hits(item, modules)
        if not hits and not weights:
            hint = ""
            if isinstance(item, str) and any(c in item for c in "*+?[](){}|^$\\"):
                hint = (
                    "; a plain string matches a module name or dotted suffix, not a regular "
                    f"expression: for one, pass re.compile({item!r})"
                )
            raise ValueError(f"target {_show(item)} matched no module{hint}; {_suggest(item, modules)}")
        whole |= hits
        for owner, names in weights.items():
            by_weight.setdefault(owner, set()).update(names)
    chosen = whole | set(by_weight)
    selection: dict[str, tuple[str, ...]] = {}
    for owner, names in by_weight.items():
        order = expert_weights(modules[owner])
        if owner not in whole and set(order) - names:  # (every weight named: the whole module)
            selection[owner] = tuple(n for n in order if n in names)
    return [p for p in modules if p in chosen], selection


def _parameter_hits(item: object, modules: dict[str, nn.Module]) -> dict[str, set[str]]:
    """owner path -> the names of its expert weights whose paths ``item`` (a string or a regex)
    selects; a ``ValueError`` when it selects a 3-D parameter of a module of unknown layout."""
    if not isinstance(item, (str, re.Pattern)) or item in (ALL_LINEAR, QUERY_VALUE):
        return {}

    def selects(path: str) -> bool:
        return name_matches(path, item) if isinstance(item, str) else item.fullmatch(path) is not None

    hits: dict[str, set[str]] = {}
    for owner, module in modules.items():
        known = expert_weights(module)
        for name, param in module._parameters.items():
            if param is None or param.ndim != 3 or not selects(f"{owner}.{name}"):
                continue
            if name not in known:
                raise ValueError(
                    f"target {_show(item)} selects the 3-D parameter {owner}.{name} "
                    f"{tuple(param.shape)} of {type(module).__name__}, whose layout deltatune does not "
                    "understand: it adapts the fused experts of transformers' MoE models (a module "
                    "with is_transposed and _apply_gate, as use_experts_implementation declares "
                    "them, and weights gate_up_proj (or up_proj where has_gate is false) and "
                    "down_proj, each (experts, out, in), or (experts, in, out) when is_transposed)"
                )
            hits.setdefault(owner, set()).add(name)
    return hits


def _named_sets(items: list[object], modules: dict[str, nn.Module]) -> list[object]:
    """``items`` with :data:`QUERY_VALUE` replaced by the names it stands for on this model."""
    if QUERY_VALUE not in items:
        return items
    names = query_value_names(modules)
    if names is None:
        known = (
            ", ".join("/".join(n) for n in QUERY_VALUE_NAMES[:-1]) + " or " + "/".join(QUERY_VALUE_NAMES[-1])
        )
        raise ValueError(
            f"target {QUERY_VALUE!r} matched no module: the model has no attention query and value "
            f"projections (named {known}); {_suggest('query', modules)}"
        )
    out: list[object] = []
    for item in items:
        out.extend(names if isinstance(item, str) and item == QUERY_VALUE else [item])
    return out


def _show(item: object) -> str:
    if isinstance(item, re.Pattern):
        return f"re.compile({item.pattern!r})"
    if isinstance(item, type):
        return item.__name__
    return repr(item)


def _suggest(item: object, modules: dict[str, nn.Module]) -> str:
    leaves = sorted(
        {p.split(".")[-1] for p in modules} | {n for m in modules.values() for n in expert_weights(m)}
    )
    probe = ""
    if isinstance(item, str):
        probe = item.split(".")[-1]
    elif isinstance(item, re.Pattern):
        probe = item.pattern
    elif isinstance(item, Target) and item.names:
        probe = item.names[0].split(".")[-1]
    close = difflib.get_close_matches(probe, leaves, n=5, cutoff=0.5) if probe else []
    if close:
        return "close module names: " + ", ".join(close)
    sample = list(modules)[:8]
    return "modules include: " + ", ".join(sample) + (" ..." if len(modules) > 8 else "")
