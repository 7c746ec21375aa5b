"""A merged Hugging Face model: the adapter folded into the weights, saved as transformers saves a
model (``config.json``, safetensors shards, the tokenizer beside it), so that
``AutoModelForCausalLM.from_pretrained`` (and vLLM, TGI, SGLang) load it without deltatune.

Every mergeable method merges (LoRA and its family, DoRA, VeRA, BitFit, SAID, ...); a model-level
method (prompts, prefixes) or an input-dependent one is refused by :func:`deltatune.merge` with the
reason. A 4-bit base is dequantised: the adapter merges into the weights it was trained on.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..runtime.core import merge
from ..runtime.quantized_base import dequantize
from . import files

__all__ = ["export_merged"]


def export_merged(
    model: nn.Module,
    folder: str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    in_place: bool = False,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` with its active adapters merged to ``folder`` (``save_pretrained``).

    Args:
        tokenizer: saved beside the model when given (anything with ``save_pretrained``).
        in_place: merge into ``model`` itself (no copy: half the memory; the model is left merged
            and without adapters) instead of a copy.
        overwrite: replace an existing, non-empty ``folder`` whole (False: refuse it).

    Returns:
        The folder; written whole or not at all.
    """
    out = files.check_out(folder, overwrite=overwrite, what="export_merged")
    if not hasattr(model, "save_pretrained"):
        raise ValueError(
            f"export_merged: {type(model).__name__} is not a transformers model (no save_pretrained); "
            "merge it with deltatune.merge and save its state_dict"
        )
    plain = model if in_place else copy.deepcopy(model)
    merge(plain, dequantize=True)  # a 4-bit base: into its dequantised weights (what it trained on)
    dequantize(plain)  # the 4-bit modules no adapter touched
    plain.to("cpu")

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    # Through a temporary folder: a failed save leaves no half model, and the files get the usual
    # permissions (safetensors >= 0.8 writes model.safetensors 0o600 otherwise).
    return files.write_folder(out, write, keep_others=False)
