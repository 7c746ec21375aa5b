"""A 4-bit base, recorded and rebuilt: what an adapter trained on one needs to load again.

:func:`deltatune.save` records a model's NF4 modules (:func:`quantized_record`) in the adapter's
``quantized_base``; :func:`deltatune.load` reads it back through :func:`load_plan`, which quantises
what the adapter needs (a QPiSSA residual, always; every recorded module with ``quantize=True``),
with the settings it was trained with. :func:`dequantize` and :func:`weight_bytes` serve the
merged-model and memory reports. The quantiser itself is :mod:`deltatune.runtime.quant`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
from typing import Any

import torch
from torch import nn

from ..targets import ALL_LINEAR, TargetSpec, resolve
from . import wrapper
from .quant import NF4Linear, NF4Settings, quantize

__all__ = [
    "RECORD_KEY",
    "LoadPlan",
    "check_record",
    "compact",
    "dequantize",
    "float_linears",
    "load_plan",
    "quantized_record",
    "weight_bytes",
]


def _paths(paths: list[str]) -> str:
    return ", ".join(repr(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def float_linears(model: nn.Module, targets: TargetSpec = ALL_LINEAR) -> dict[str, nn.Linear]:
    """path -> module of the modules among ``targets`` (default: every linear layer but the heads)
    that are float ``nn.Linear`` layers still (not quantised yet), seen through adapters (an adapted
    path gives its base)."""
    att = wrapper.attachment_of(model) if wrapper.has_adapters(model) else None
    modules = wrapper.base_modules(model, att)
    found = {p: modules[p] for p in resolve(model, targets, modules)}
    return {p: m for p, m in found.items() if type(m) is nn.Linear}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, a 4-bit weight at what it stores
    (:meth:`NF4Linear.storage_bytes`), each shared tensor once."""
    quantized = {id(m.weight): m.storage_bytes() for m in model.modules() if isinstance(m, NF4Linear)}
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        total += quantized.get(id(t), t.numel() * t.element_size())
    return total


def compact(model: nn.Module) -> None:
    """After quantising a model on the CPU, give the memory of the float weights back.

    A model loaded from safetensors keeps its weights in one mapping of the checkpoint file; the
    tensors that stay float (embeddings, norms, heads) hold that whole mapping, and the float copies
    of the 4-bit weights with it. Copying those tensors into memory of their own lets it go.
    Quantising also leaves freed blocks in the C heap, which glibc keeps until ``malloc_trim``.
    GPU tensors are left as they are (their file mapping went when they moved to the GPU).
    """
    four = {id(m.weight) for m in model.modules() if isinstance(m, NF4Linear)}
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in four and t.device.type == "cpu":
                t.data = t.data.clone()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def dequantize(model: nn.Module) -> list[str]:
    """Replace every 4-bit module by a float ``nn.Linear`` holding its dequantised weight (an adapted
    one keeps its adapter, now on the float weight); returns their paths. After
    ``deltatune.merge(model, dequantize=True)``, what a merged model needs before ``save_pretrained``:
    the modules without an adapter are still 4-bit."""
    done = []
    for path, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            wrapper.set_submodule(model, path, module.dequantize())
            done.append(path)
    return done


#: The key of an adapter's config that records its 4-bit base (:func:`quantized_record`).
RECORD_KEY = "quantized_base"


def quantized_record(model: nn.Module) -> dict[str, Any] | None:
    """What :func:`deltatune.save` records of a model's 4-bit modules (None: it has none).

    ``{"format": "nf4", "block_size": 64, "scaler_block_size": null, "modules": [...],
    "residual": [...], "iterations": T}``: every quantised module, and among them those holding a
    QPiSSA residual (quantised after a weight-derived initialisation, in ``iterations`` rounds).
    """
    att = wrapper.attachment_of(model) if wrapper.has_adapters(model) else None
    found = {p: m for p, m in wrapper.base_modules(model, att).items() if isinstance(m, NF4Linear)}
    if not found:
        return None
    blocks = {(m.settings.block_size, m.settings.scaler_block_size) for m in found.values()}
    rounds = {m.settings.iterations for m in found.values() if m.settings.iterations is not None}
    if len(blocks) > 1 or len(rounds) > 1:
        raise ValueError(
            "save: the 4-bit modules were quantised with different settings (block sizes "
            f"{sorted(blocks, key=str)}, QPiSSA iterations {sorted(rounds)}); an adapter records one "
            "setting: quantise the model in one quantize() call"
        )
    ((block_size, scaler_block_size),) = blocks
    return {
        "format": "nf4",
        "block_size": block_size,
        "scaler_block_size": scaler_block_size,
        "iterations": next(iter(rounds), 1),
        "modules": sorted(found),
        "residual": sorted(p for p, m in found.items() if m.settings.iterations is not None),
    }


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` (an adapter's ``quantized_base``) checked field by field."""
    fields = {"format", "block_size", "scaler_block_size", "iterations", "modules", "residual"}
    if not isinstance(record, dict) or set(record) != fields:
        raise ValueError(f"{where}: quantized_base must be a mapping of {sorted(fields)}, got {record!r}")
    if record["format"] != "nf4":
        raise ValueError(f"{where}: quantized_base.format {record['format']!r} is not supported (nf4 is)")
    for name in ("block_size", "iterations"):
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: quantized_base.{name} must be an integer >= 1, got {value!r}")
    sbs = record["scaler_block_size"]
    if sbs is not None and (isinstance(sbs, bool) or not isinstance(sbs, int) or sbs < 1):
        raise ValueError(f"{where}: quantized_base.scaler_block_size must be null or an integer >= 1")
    for name in ("modules", "residual"):
        if not isinstance(record[name], list) or not all(isinstance(m, str) for m in record[name]):
            raise ValueError(f"{where}: quantized_base.{name} must be a list of module paths")
    if not set(record["residual"]) <= set(record["modules"]):
        raise ValueError(f"{where}: quantized_base.residual must be among quantized_base.modules")
    return record


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """What loading an adapter quantises: ``before`` it is injected (plain weights, QLoRA) and
    ``after`` (QPiSSA residuals, which the adapter's initialisation defines), with ``settings``."""

    before: list[str]
    after: list[str]
    settings: NF4Settings

    def quantize_before(self, model: nn.Module) -> None:
        if self.before:
            quantize(
                model,
                self.before,
                block_size=self.settings.block_size,
                scaler_block_size=self.settings.scaler_block_size,
            )

    def quantize_after(self, model: nn.Module) -> None:
        if self.after:
            quantize(
                model,
                self.after,
                iterations=self.settings.iterations or 1,
                block_size=self.settings.block_size,
                scaler_block_size=self.settings.scaler_block_size,
            )


def load_plan(model: nn.Module, record: Any, quantize: bool | None, where: str) -> LoadPlan | None:
    """How to load an adapter that records ``record`` (its ``quantized_base``, or None) onto ``model``.

    ``quantize``: True rebuilds the base it was trained on (every recorded module in 4 bits); None
    (the default of :func:`deltatune.load`) quantises only what the adapter cannot do without (a QPiSSA
    residual: its factors are relative to it) and loads a QLoRA adapter on the base as given, float
    or 4-bit; False never quantises (a QPiSSA adapter is then refused).
    """
    if record is None:
        if quantize:
            raise ValueError(
                f"{where} was trained on a float base: there is nothing to quantise for it (pass "
                "quantize=None, or quantize the model yourself: deltatune.runtime.quant.quantize)"
            )
        return None
    record = check_record(record, where)
    if record["residual"] and quantize is False:
        raise ValueError(
            f"{where} was trained on a 4-bit residual (QPiSSA: {_paths(record['residual'])}); its "
            "factors are relative to it, so it cannot load on the float base: load it with quantize "
            "left at None or True (deltatune generate/eval: drop --quantize none)"
        )
    att = wrapper.attachment_of(model) if wrapper.has_adapters(model) else None
    modules = wrapper.base_modules(model, att)
    missing = [m for m in record["modules"] if m not in modules]
    if missing:
        raise ValueError(f"{where}: the model has no module {_paths(missing)} (recorded as quantised)")
    residual = set(record["residual"])
    already = [m for m in residual if getattr(modules[m], "quantized", False)]
    if already:
        raise ValueError(
            f"{where}: {_paths(already)} is already quantised, but this QPiSSA adapter needs its own "
            "4-bit residual there: load it on the float base"
        )
    plain = [m for m in record["modules"] if m not in residual] if quantize else []
    settings = NF4Settings(record["block_size"], record["scaler_block_size"], record["iterations"])
    return LoadPlan(
        [m for m in plain if not getattr(modules[m], "quantized", False)], sorted(residual), settings
    )
