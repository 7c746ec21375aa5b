"""Any low-rank adapter as a plain LoRA: the one adapter form every serving stack reads.

vLLM and SGLang serve PEFT's plain LoRA only (no DoRA, no ``modules_to_save``, no bias: vLLM issue
10849), and llama.cpp reads a plain LoRA converted to GGUF. Most of deltatune's methods are, at any
moment, exactly a plain LoRA of some rank: each layer says so through the contract's
:meth:`~deltatune.contract.Layer.lora_form` (``scale · B A``; VeRA's ``Λ_b B Λ_d A``, VB-LoRA's
composed vectors, Tied-LoRA's scaled shared pair, AdaLoRA's kept triplets, PiSSA's rank-2r
difference from the original weight, Delta-LoRA's telescoped update, ReLoRA's stacked folds, O-LoRA's
task sum, LoRA-drop's shared pairs). This module reads those factors, makes them as small as they
exactly are (:func:`compact`: Delta-LoRA's 3r columns are 2r) and writes them as PEFT's ``LORA``.

* ``runtime="peft"``: ranks and scales per module in ``rank_pattern`` / ``alpha_pattern`` (PEFT loads
  it with our outputs to float rounding), ``modules_to_save`` copied as PEFT stores them.
* ``runtime="vllm"``: only what vLLM accepts: one rank for every module (smaller factors padded with
  zeros, exactly), one scale (each module's folded into its B: ``lora_alpha == r``), no
  ``modules_to_save``, linear layers only, rank at most ``max_rank`` (vLLM's ``--max-lora-rank``).

An update that is not low-rank (DoRA's magnitudes, a dense ReLoRA fold, SAID's projection) is refused,
pointing at the merged model, unless ``approximate_rank=R`` asks for the best rank-R LoRA of its
weight change (a truncated SVD); the relative error of each module is returned and printed by the
command. Methods whose update is no weight change (prompts, prefixes, bottleneck adapters, BitFit,
input-dependent mixtures such as AM-LoRA's) are refused with the reason.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> import deltatune as dt
    >>> from deltatune.formats.lora import export_lora
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> _ = dt.inject(net, dt.VeRA(rank=4), targets=["0", "2"])
    >>> report = export_lora(net, tempfile.mkdtemp() + "/vera-as-lora")
    >>> report.ranks, report.max_error
    ({'0': 4, '2': 4}, 0.0)
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .. import anatomy
from ..runtime.deltas import Factors, module_updates, truncate
from ..runtime.wrapper import Attachment, attachment_of
from . import files
from .peft.convert import module_copies

__all__ = ["LoraExport", "export_lora", "lora_factors"]

PEFT_PREFIX = "base_model.model."
RUNTIMES = ("peft", "vllm")


@dataclass(frozen=True)
class LoraExport:
    """What :func:`export_lora` wrote: the folder, each module's rank, and each module's relative
    error ``‖ΔW − ΔW_lora‖_F / ‖ΔW‖_F`` (0.0 where the export is exact)."""

    folder: Path
    ranks: dict[str, int]
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def lora_factors(
    model: nn.Module,
    adapter: str | None = None,
    *,
    approximate_rank: int | None = None,
    what: str = "export",
) -> tuple[str, dict[str, Factors], dict[str, float]]:
    """``(adapter name, path -> factors, path -> relative error)`` for every module the adapter
    updates, each as small as it exactly is.

    Raises:
        ValueError: a module whose update is not low-rank (unless ``approximate_rank``) or is no
            weight change at all, naming it, the method and what to do instead.
    """
    att = attachment_of(model)
    name = adapter if adapter is not None else (att.active[0] if att.active else next(iter(att.adapters)))
    method = type(att.info(name).method).__name__
    if approximate_rank is not None and approximate_rank < 1:
        raise ValueError(f"{what}: approximate_rank must be a positive integer, not {approximate_rank}")
    out: dict[str, Factors] = {}
    errors: dict[str, float] = {}
    for path, update in module_updates(model, name, what).items():
        if isinstance(update, Factors):
            out[path], errors[path] = update, 0.0
            continue
        if approximate_rank is None:
            layer = att.wrappers[path].adapters[name]
            raise ValueError(
                f"{what}: {method} at {path!r} is not a low-rank update ({type(layer).__name__}), so a "
                "plain LoRA cannot hold it exactly; export the merged model (--to merged), or pass "
                "--approximate-rank R (approximate_rank=R) for the best rank-R LoRA of it, whose "
                "relative error per module is reported"
            )
        kind = str(getattr(att.wrappers[path].adapters[name], "kind", "linear"))
        out[path], errors[path] = truncate(update, approximate_rank, kind)
    return name, out, errors


def _target_modules(model: nn.Module, paths: list[str]) -> list[str] | str:
    """PEFT's ``target_modules``: the paths as a list (PEFT matches an entry as a name or a dotted
    suffix), or, where an entry would also match another module (``fc1`` and ``block.fc1``), one
    regular expression that PEFT matches against whole names."""
    names = [n for n, _ in anatomy.named_modules(model)]
    chosen = set(paths)
    if any(n not in chosen and n.endswith("." + p) for n in names for p in paths):
        return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"
    return paths


def _anchored(path: str) -> str:
    return "^" + re.escape(path) + "$"


def _peft_key(path: str, kind: str, which: str) -> str:
    if kind == "embedding":
        return f"{PEFT_PREFIX}{path}.lora_embedding_{which}"
    return f"{PEFT_PREFIX}{path}.lora_{which}.weight"


def _padded(f: Factors, rank: int) -> Factors:
    """The same update with ``rank`` columns (zeros appended) and scale 1 (folded into B)."""
    extra = rank - f.rank
    A = torch.cat([f.A, f.A.new_zeros(extra, f.A.shape[1])]) if extra else f.A
    B = f.B * f.scale
    B = torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1) if extra else B
    return Factors(A, B, 1.0, f.kind)


def _vllm_checks(factors: dict[str, Factors], modules_to_save: tuple[str, ...], max_rank: int | None) -> None:
    if modules_to_save:
        raise ValueError(
            f"export for vllm: the adapter saves whole modules ({', '.join(modules_to_save)}, "
            "modules_to_save), which vLLM does not load (vLLM issue 10849); export the merged model "
            "(--to merged), or drop them with --for peft if the base's own head serves"
        )
    other = sorted(p for p, f in factors.items() if f.kind != "linear")
    if other:
        raise ValueError(
            f"export for vllm: vLLM applies LoRA to linear layers only; {other[0]!r} is a "
            f"{factors[other[0]].kind} ({len(other)} such modules); export with --for peft, or merge"
        )
    rank = max(f.rank for f in factors.values())
    if max_rank is not None and rank > max_rank:
        worst = max(factors, key=lambda p: factors[p].rank)
        raise ValueError(
            f"export for vllm: rank {rank} (at {worst!r}) is above --max-rank {max_rank} (vLLM's "
            f"--max-lora-rank); raise vLLM's limit, or pass --approximate-rank {max_rank} for an "
            "SVD-truncated LoRA"
        )


def export_lora(
    model: nn.Module,
    folder: str | os.PathLike[str],
    adapter: str | None = None,
    *,
    runtime: Literal["peft", "vllm"] = "peft",
    max_rank: int | None = None,
    approximate_rank: int | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    overwrite: bool = True,
) -> LoraExport:
    """Write the adapter as PEFT's plain ``LORA`` folder (see the module docstring).

    Args:
        runtime: ``"peft"`` (per-module ranks and alphas, ``modules_to_save``) or ``"vllm"`` (only
            what vLLM loads; refused with the reason otherwise).
        max_rank: the largest rank the runtime takes (vLLM's ``--max-lora-rank``).
        approximate_rank: export updates that are not low-rank as their best rank-R LoRA.
        overwrite: replace an existing, non-empty ``folder`` whole (False: refuse it).

    Returns:
        The folder, the rank and the relative error of every module.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"export: runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    out = files.check_out(folder, overwrite=overwrite, what="export")
    name, factors, errors = lora_factors(model, adapter, approximate_rank=approximate_rank)
    att: Attachment = attachment_of(model)
    info = att.info(name)
    if max_rank is not None and runtime == "peft":
        worst = max(factors, key=lambda p: factors[p].rank)
        if factors[worst].rank > max_rank:
            raise ValueError(
                f"export: rank {factors[worst].rank} at {worst!r} is above max_rank {max_rank}; pass "
                f"--approximate-rank {max_rank} for an SVD-truncated LoRA"
            )
    if runtime == "vllm":
        _vllm_checks(factors, info.modules_to_save, max_rank)
        rank = max(f.rank for f in factors.values())
        factors = {p: _padded(f, rank) for p, f in factors.items()}
    tensors: dict[str, torch.Tensor] = {}
    for path, f in factors.items():
        tensors[_peft_key(path, f.kind, "A")] = f.A.detach().clone()  # (tied factors share storage)
        tensors[_peft_key(path, f.kind, "B")] = f.B.detach().clone()
    common = Counter((f.rank, f.scale) for f in factors.values()).most_common(1)[0][0]
    r, scale = common
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": scale * r,
        # (keys anchored on the whole path, as PEFT matches them by regular expression)
        "rank_pattern": {_anchored(p): f.rank for p, f in factors.items() if f.rank != r},
        "alpha_pattern": {
            _anchored(p): f.scale * f.rank for p, f in factors.items() if (f.rank, f.scale) != common
        },
        "target_modules": _target_modules(model, sorted(factors)),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": any(f.kind == "conv1d" for f in factors.values()),
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    if runtime == "peft" and info.modules_to_save:
        tensors.update(module_copies(model, name, PEFT_PREFIX))
        config["modules_to_save"] = list(info.modules_to_save)
    files.write_files(
        out,
        {
            "adapter_config.json": files.json_writer(config),
            "adapter_model.safetensors": files.tensors_writer(tensors, metadata={"format": "pt"}),
        },
        keep_others=False,
    )
    return LoraExport(out.resolve(), {p: f.rank for p, f in factors.items()}, errors)
