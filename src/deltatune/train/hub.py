"""The Hugging Face hub switches both model and data loading honour.

``huggingface_hub`` and ``datasets`` read ``HF_HUB_OFFLINE`` (``HF_DATASETS_OFFLINE``) and their
timeouts from the environment once, at import, into module constants they consult at call time. A
process that imported them before the variable was set (a notebook, a test, a long-lived server)
would otherwise go on the network and retry a failing connection for half a minute; patching the
constants for the duration of one load makes the switch and a short timeout take effect now.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

_TRUE = {"1", "ON", "YES", "TRUE"}

#: Seconds a hub request may take before a load gives up on the network.
HUB_TIMEOUT_S = 10


def offline(*, data: bool = False) -> bool:
    """Whether the environment forbids the network: ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``
    (and, for data sets, ``HF_DATASETS_OFFLINE``) set to a true value."""
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if data else [])
    return any(os.environ.get(n, "").strip().upper() in _TRUE for n in names)


@contextlib.contextmanager
def hub_settings(offline: bool, timeout_s: int) -> Iterator[None]:
    """Temporarily set huggingface_hub's (and, where imported, datasets') offline switch and cap the
    hub's timeouts.

    Offline mode blocks every request at the HTTP layer, which matters because ``local_files_only=True``
    alone does not reach every lookup transformers makes (e.g. its PEFT ``adapter_config.json`` probe,
    which otherwise retries a failing connection for ~25 s).
    """
    from huggingface_hub import constants

    names = ("HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")
    saved = {n: getattr(constants, n) for n in names}
    data_config = getattr(sys.modules.get("datasets"), "config", None)
    data_saved = getattr(data_config, "HF_HUB_OFFLINE", None)
    try:
        constants.HF_HUB_OFFLINE = offline or bool(saved["HF_HUB_OFFLINE"])
        constants.HF_HUB_ETAG_TIMEOUT = min(int(saved["HF_HUB_ETAG_TIMEOUT"]), timeout_s)
        constants.HF_HUB_DOWNLOAD_TIMEOUT = min(int(saved["HF_HUB_DOWNLOAD_TIMEOUT"]), timeout_s)
        if data_config is not None:
            data_config.HF_HUB_OFFLINE = offline or bool(data_saved)
        yield
    finally:
        for n, v in saved.items():
            setattr(constants, n, v)
        if data_config is not None:
            data_config.HF_HUB_OFFLINE = data_saved
