"""Regional compilation: ``torch.compile`` each transformer block of an adapted model, in place.

Compiling block by block (the blocks located by :mod:`deltatune.anatomy`) instead of the whole model
compiles one block's graph and reuses it for every layer of the same shape, so the first step costs
seconds rather than minutes, and it composes with FSDP2, which shards the same blocks. The adapters'
forward passes trace without graph breaks (no data-dependent Python branch, no per-call allocation:
``tests/test_compile.py`` checks every method on a Llama block), except LoRA-drop, which reads its
decision flag once per module and call.

``deltatune.compile(model)`` leaves the modules, their names and their ``state_dict`` as they were
(``nn.Module.compile``), so saving, loading, merging and the optimizer see the same parameters.
``deltatune train --compile true`` does it after the adapter is in place (and after sharding).

Example:
    >>> import torch, transformers
    >>> import deltatune as dt
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    >>> model = transformers.LlamaForCausalLM(cfg)
    >>> _ = dt.inject(model, dt.LoRA(rank=2), targets=["q_proj", "v_proj"])
    >>> dt.compile(model, backend="eager")  # the blocks it compiled
    ['model.layers.0', 'model.layers.1']
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .. import anatomy

__all__ = ["compile"]


def compile(model: nn.Module, **options: Any) -> list[str]:
    """``torch.compile(block, **options)`` for every transformer block of ``model``, in place.

    Args:
        options: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

    Returns:
        The paths of the compiled blocks.

    Raises:
        ValueError: a model whose blocks :mod:`deltatune.anatomy` cannot find (describe it with an
            ``Anatomy``, or compile it whole with ``torch.compile``).
    """
    try:
        blocks = anatomy.describe(model).blocks
    except ValueError as e:
        raise ValueError(
            f"compile: regional compilation compiles each transformer block; {e}. "
            "Or compile the whole model with torch.compile(model)"
        ) from None
    for path in blocks:
        model.get_submodule(path).compile(**options)
    return list(blocks)
