"""Registered methods: one file each, holding only the method's math.

Every module of this package is imported when the package is, so a new method registers by its own
``@register`` line alone; the names below are the public API (``deltatune.LoRA``, ...).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .adapter import Adapter, AdapterLayer
from .bitfit import BitFit, BitFitLayer
from .dora import DoRA
from .intrinsic import IntrinsicDimension, IntrinsicLayer, IntrinsicVector
from .lora import Gaussian, KaimingUniform, LoRA, LoRAInit, LoRALayer
from .lora_fa import LoRAFA
from .p_tuning import EncodedPrompt, PromptEncoder, PTuning
from .partial import BlockCopy, Partial
from .pissa import CorDA, MiLoRA, PiSSA, collect_covariance, randomized_svd
from .prefix_tuning import Prefixes, PrefixMLP, PrefixTuning
from .prompt_tuning import FromText, PromptInit, PromptTuning, RandomUniform, SampledVocab, VirtualTokens
from .tied_lora import TiedLoRA
from .vblora import VBLoRA, VBLoRALayer, VectorBank
from .vera import VeRA

__all__ = [
    "Adapter",
    "AdapterLayer",
    "BitFit",
    "BitFitLayer",
    "BlockCopy",
    "CorDA",
    "DoRA",
    "EncodedPrompt",
    "FromText",
    "Gaussian",
    "IntrinsicDimension",
    "IntrinsicLayer",
    "IntrinsicVector",
    "KaimingUniform",
    "LoRA",
    "LoRAFA",
    "LoRAInit",
    "LoRALayer",
    "MiLoRA",
    "PTuning",
    "Partial",
    "PiSSA",
    "PrefixMLP",
    "PrefixTuning",
    "Prefixes",
    "PromptEncoder",
    "PromptInit",
    "PromptTuning",
    "RandomUniform",
    "SampledVocab",
    "TiedLoRA",
    "VBLoRA",
    "VBLoRALayer",
    "VeRA",
    "VectorBank",
    "VirtualTokens",
    "collect_covariance",
    "randomized_svd",
]

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")
