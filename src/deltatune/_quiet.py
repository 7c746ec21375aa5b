"""Keep two known, harmless import-time messages of dependencies out of every run's output.

transformers imports torchao when it is installed (``deltatune[quant]``), and each import printed:

* ``Failed to load .../torchao/_C_mxfp8...so`` and ``..._C_cutlass_90a.abi3.so``: torchao's CUDA
  kernels, which cannot load into a CPU-only build of torch and are not needed there (NF4, which
  deltatune uses, is plain PyTorch). Dropped only when the installed torch has no CUDA: on a CUDA
  build a kernel that fails to load is a real problem and stays visible.
* ``<enum 'KernelPreference'> is an Enum subclass ... register_constant() on Enum subclasses is
  deprecated``: torch's note to torchao's developers (torchao registers its enums with pytree),
  nothing a user can act on.

Both are dropped by filters on those two loggers that match these messages alone; every other record
of torchao and torch passes, and ``DELTATUNE_VERBOSE_IMPORTS=1`` turns the filters off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch


class _DropKnownNoise(logging.Filter):
    """Drops the records whose message satisfies ``matches``; passes every other record."""

    def __init__(self, matches: Callable[[str], bool]) -> None:
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not self.matches(message)


def _torchao_cuda_kernel(message: str) -> bool:
    return message.startswith("Failed to load ") and "/torchao/_C" in message


def _pytree_enum_note(message: str) -> bool:
    return "is an Enum subclass and is now natively supported" in message


def install() -> None:
    """Add the filters (once); a no-op when ``DELTATUNE_VERBOSE_IMPORTS`` is set to 1."""
    if os.environ.get("DELTATUNE_VERBOSE_IMPORTS") == "1":
        return
    targets: list[tuple[str, logging.Filter]] = [
        ("torch.utils._pytree", _DropKnownNoise(_pytree_enum_note)),
    ]
    if torch.version.cuda is None:  # CPU-only torch: torchao's CUDA kernels cannot load and are not used
        targets.append(("torchao", _DropKnownNoise(_torchao_cuda_kernel)))
    for name, new in targets:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(new)


install()
