"""llama.cpp's format (GGUF): a LoRA adapter file, and a whole model (a merged one, or the base).

llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs a GGUF model with optional GGUF LoRA
adapters (``llama-cli -m base.gguf --lora adapter.gguf``). :func:`export_gguf_lora` writes the file
that llama.cpp's own ``convert_lora_to_gguf.py`` writes for the same PEFT LoRA, without llama.cpp's
source tree: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per
module ``<gguf name>.weight.lora_a`` (r, in) and ``.lora_b`` (out, r), B's rows of the query and key
projections permuted as llama.cpp's converter permutes those weights (its rotary layout differs from
Hugging Face's). llama.cpp scales each module by ``alpha / r`` with one alpha per file: a module
whose scale differs has it folded into its B. Every low-rank method goes through the plain-LoRA form
of :mod:`deltatune.formats.lora`.

:func:`export_gguf_model` writes a model's weights (``f32``, ``f16`` or ``q8_0``; norms stay f32)
with the architecture keys read off its config and every other key (the tokenizer, the chat
template, the names) copied from a ``template`` GGUF of the same base: the file llama.cpp runs.
:func:`export_gguf_merged` merges the adapter into a copy of the model first.

Llama-family models (``model_type`` llama or mistral: Llama 2/3, SmolLM, TinyLlama, Mistral) are
written; another architecture is refused with the way round (a PEFT LoRA and llama.cpp's converter).
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..runtime.core import merge
from ..runtime.quant import NF4Linear
from ..runtime.quantized_base import dequantize
from ..runtime.wrapper import attachment_of, has_adapters
from . import files
from .lora import LoraExport, lora_factors

__all__ = ["GGUF_TYPES", "export_gguf_lora", "export_gguf_model", "permute_rows"]

#: The tensor encodings a model file can be written in.
GGUF_TYPES = ("f32", "f16", "q8_0")
_FAMILY = ("llama", "mistral")  # model_type -> llama.cpp's "llama" architecture


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a dependency of deltatune
        raise ImportError("writing GGUF needs the gguf package: pip install gguf") from e
    return gguf


@dataclass(frozen=True)
class _Arch:
    config: Any
    n_head: int
    n_kv: int
    names: Any  # gguf.TensorNameMap

    def name(self, path: str, what: str) -> str:
        """llama.cpp's name of the module at ``path`` (``blk.3.attn_q``)."""
        found = self.names.get_name(path)
        if found is None:
            raise ValueError(
                f"{what}: llama.cpp's llama architecture has no tensor for {path!r}; adapt the "
                "attention and MLP projections only, or export the merged model"
            )
        return str(found)

    def permuted(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """``rows`` (the output dimension first) in llama.cpp's layout of ``name``'s weight."""
        if name.endswith(".attn_q") or name.endswith(".attn_q.weight"):
            return permute_rows(rows, self.n_head)
        if name.endswith(".attn_k") or name.endswith(".attn_k.weight"):
            return permute_rows(rows, self.n_kv)
        return rows


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotary layout of a query/key projection's rows (the two halves of each head)
    to llama.cpp's (interleaved pairs), as llama.cpp's ``convert_hf_to_gguf.py`` permutes them."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch(model: nn.Module, what: str) -> _Arch:
    config: Any = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in _FAMILY:
        raise ValueError(
            f"{what}: GGUF is written for Llama-family models ({', '.join(_FAMILY)}), not "
            f"{kind or type(model).__name__}; export a PEFT LoRA (--to peft-lora) and convert it with "
            "llama.cpp's convert_lora_to_gguf.py, or the merged model with convert_hf_to_gguf.py"
        )
    gguf = _gguf()
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    return _Arch(config, n_head, n_kv, names)


def _write(path: Path, arch: str, fill: Callable[[Any], None]) -> Path:
    """A GGUF file at ``path``, written whole or not at all (a temporary sibling renamed over it)."""
    gguf = _gguf()

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return files.write_file(path, write)


def export_gguf_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter: str | None = None,
    *,
    approximate_rank: int | None = None,
    overwrite: bool = True,
) -> LoraExport:
    """Write the adapter as llama.cpp's GGUF LoRA (see the module docstring); float32 tensors.

    Returns:
        The file, each module's rank and relative error (0.0: exact).

    Raises:
        ValueError: not a Llama-family model, a module llama.cpp has no tensor for (embeddings:
            merge instead), ``modules_to_save`` (llama.cpp adapters hold LoRA tensors only), or
            what :func:`deltatune.formats.lora.lora_factors` refuses.
    """
    what = "export to gguf"
    out = files.check_out(path, overwrite=overwrite, what=what)
    arch = _arch(model, what)
    name, factors, errors = lora_factors(model, adapter, approximate_rank=approximate_rank, what=what)
    saved = _modules_to_save(model, name)
    if saved:
        raise ValueError(
            f"{what}: the adapter saves whole modules ({', '.join(saved)}), which a llama.cpp LoRA "
            "cannot hold; export the merged model (--to gguf-merged)"
        )
    embedded = [p for p, f in factors.items() if f.kind != "linear"]
    if embedded:
        raise ValueError(
            f"{what}: {embedded[0]!r} is a {factors[embedded[0]].kind}; llama.cpp's LoRA is written "
            "for linear projections here: export the merged model (--to gguf-merged)"
        )
    # One alpha per file: the most common scale x rank; other modules fold theirs into B.
    alpha = Counter(f.scale * f.rank for f in factors.values()).most_common(1)[0][0]
    tensors: list[tuple[str, np.ndarray[Any, Any]]] = []
    for path_, f in factors.items():
        gname = arch.name(path_, what)
        B = f.B if f.scale * f.rank == alpha else f.B * (f.scale * f.rank / alpha)
        B = arch.permuted(B.detach().float(), gname)
        tensors.append((f"{gname}.weight.lora_a", f.A.detach().float().contiguous().numpy()))
        tensors.append((f"{gname}.weight.lora_b", B.contiguous().numpy()))
    gguf = _gguf()

    def fill(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for tensor_name, data in tensors:
            writer.add_tensor(tensor_name, data)

    written = _write(out, "llama", fill)
    return LoraExport(written.resolve(), {p: f.rank for p, f in factors.items()}, errors)


def _modules_to_save(model: nn.Module, name: str) -> tuple[str, ...]:
    return attachment_of(model).info(name).modules_to_save


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta: Any = params.get("rope_theta") if isinstance(params, dict) else None
    if theta is None:
        theta = getattr(config, "rope_theta", 10000.0)
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if kind != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"):
        raise ValueError(
            f"write gguf: rotary scaling {kind!r} is not written here; convert the merged model with "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    return float(theta)


def _architecture_keys(writer: Any, arch: _Arch) -> None:
    c = arch.config
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // arch.n_head)
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_block_count(int(c.num_hidden_layers))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_kv)
    writer.add_rope_freq_base(_rope_theta(c))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(int(c.vocab_size))
    writer.add_rope_dimension_count(head_dim)


def _template_keys(template: Path, vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """The template's keys other than the file's own, the architecture's and the type."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(template))
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch != "llama":
        raise ValueError(f"write gguf: {template} is a GGUF of architecture {arch!r}, not llama")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != vocab_size:
        raise ValueError(
            f"write gguf: {template} has {len(tokens.data)} tokens, the model {vocab_size}: the template "
            "must be a GGUF of the same base model"
        )
    own = (
        "GGUF.",
        "general.architecture",
        "general.type",
        "general.file_type",
        "general.quantization_version",
    )
    out = []
    for key, field in reader.fields.items():
        if key.startswith(own) or key.startswith("llama."):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        out.append((key, field.contents(), field.types[0], sub))
    return out


def _encoded(gguf: Any, data: torch.Tensor, dtype: str) -> tuple[np.ndarray[Any, Any], Any]:
    array = data.detach().float().contiguous().numpy()
    if array.ndim == 1 or dtype == "f32":
        return array, None
    if dtype == "q8_0" and array.shape[-1] % 32 == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array, kind), kind
    return array.astype(np.float16), None  # f16 (and a row length Q8_0's blocks do not divide)


def export_gguf_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    template: str | os.PathLike[str] | None = None,
    dtype: Literal["f32", "f16", "q8_0"] = "f16",
    overwrite: bool = True,
) -> Path:
    """Write a Llama-family model as one GGUF file: an adapted model with its active adapters
    merged (into a copy: ``model`` is left as it is), a 4-bit base dequantised.

    Args:
        template: a GGUF of the same base whose other keys (tokenizer, chat template, names) are
            copied; without one the file holds the weights and architecture only (transformers
            loads it; llama.cpp needs the tokenizer keys to run it).
        dtype: ``f32``, ``f16`` or ``q8_0`` for the matrices; vectors (norms) stay f32.
    """
    what = "write gguf"
    if dtype not in GGUF_TYPES:
        raise ValueError(f"{what}: dtype must be one of {', '.join(GGUF_TYPES)}, not {dtype!r}")
    out = files.check_out(path, overwrite=overwrite, what=what)
    arch = _arch(model, what)
    if has_adapters(model) or any(isinstance(m, NF4Linear) for m in model.modules()):
        model = copy.deepcopy(model)  # merged and dequantised in a copy: ``model`` is left as it is
        if has_adapters(model):
            merge(model, dequantize=True)
        dequantize(model)
    gguf = _gguf()
    keys = _template_keys(Path(template), int(arch.config.vocab_size)) if template is not None else []
    tied = bool(getattr(arch.config, "tie_word_embeddings", False))
    tensors: list[tuple[str, np.ndarray[Any, Any], Any]] = []
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        found = arch.names.get_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            if "rotary_emb" in key:
                continue
            raise ValueError(f"{what}: llama.cpp's llama architecture has no tensor for {key!r}")
        value = arch.permuted(value, str(found).removesuffix(".weight")) if value.ndim == 2 else value
        array, kind = _encoded(gguf, value, dtype)
        tensors.append((str(found), array, kind))
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]

    def fill(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        _architecture_keys(writer, arch)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value, vtype, sub in keys:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for name, array, kind in tensors:
            writer.add_tensor(name, array, raw_dtype=kind)

    return _write(out, "llama", fill)
