"""Import-time noise of dependencies is dropped; everything else they log still shows."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import deltatune  # noqa: F401  (installs the filters)

KERNEL = "Failed to load /venv/lib/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: nope"
ENUM = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.skipif(os.environ.get("DELTATUNE_VERBOSE_IMPORTS") == "1", reason="filters turned off")
def test_known_messages_are_dropped_and_others_pass() -> None:
    # A handler on each logger itself: torch may stop its loggers from propagating to the root.
    kept = _Keep()
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    for logger in loggers:
        logger.addHandler(kept)
    try:
        loggers[0].warning(KERNEL)
        loggers[0].warning("Failed to load config.json: a real problem")
        loggers[0].warning("torchao: something else entirely")
        loggers[1].warning(ENUM, "<enum 'KernelPreference'>")
        loggers[1].warning("a different pytree warning")
    finally:
        for logger in loggers:
            logger.removeHandler(kept)
    messages = kept.messages
    assert "Failed to load config.json: a real problem" in messages
    assert "torchao: something else entirely" in messages
    assert "a different pytree warning" in messages
    assert not any("Enum subclass" in m for m in messages)
    # torchao's CUDA kernels are only noise where torch has no CUDA; on a CUDA build they stay visible
    assert (KERNEL in messages) == (torch.version.cuda is not None)


def test_importing_transformers_and_torchao_prints_no_noise() -> None:
    pytest.importorskip("torchao")
    code = "import deltatune, transformers, torchao; transformers.BertConfig()"
    env = {k: v for k, v in os.environ.items() if k != "DELTATUNE_VERBOSE_IMPORTS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "Enum subclass" not in run.stderr
    if torch.version.cuda is None:
        assert "Failed to load" not in run.stderr
