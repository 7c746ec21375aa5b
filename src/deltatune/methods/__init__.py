"""Registered methods: one file each, holding only the method's math.

Every module of this package is imported when the package is, so a new method registers by its own
``@register`` line alone; the names below are the public API (``deltatune.LoRA``, ...).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .adalora import AdaLoRA, AdaLoRALayer
from .adapter import Adapter, AdapterLayer
from .amlora import AMLoRA, AMLoRALayer
from .bitfit import BitFit, BitFitLayer
from .delta_lora import DeltaLoRA, DeltaLoRALayer
from .dora import DoRA
from .intrinsic import IntrinsicDimension, IntrinsicLayer, IntrinsicVector
from .lora import Gaussian, KaimingUniform, LoRA, LoRAInit, LoRALayer
from .lora_drop import LoRADrop
from .lora_fa import LoRAFA
from .olora import OLoRA, OLoRALayer
from .p_tuning import EncodedPrompt, PromptEncoder, PTuning
from .partial import BlockCopy, Partial
from .pissa import CorDA, MiLoRA, PiSSA, collect_covariance, randomized_svd
from .prefix_tuning import Prefixes, PrefixMLP, PrefixTuning
from .prompt_tuning import FromText, PromptInit, PromptTuning, RandomUniform, SampledVocab, VirtualTokens
from .relora import ReLoRA, ReLoRALayer, effective_rank
from .tied_lora import TiedLoRA
from .vblora import VBLoRA, VBLoRALayer, VectorBank
from .vera import VeRA

__all__ = [
    "AMLoRA",
    "AMLoRALayer",
    "AdaLoRA",
    "AdaLoRALayer",
    "Adapter",
    "AdapterLayer",
    "BitFit",
    "BitFitLayer",
    "BlockCopy",
    "CorDA",
    "DeltaLoRA",
    "DeltaLoRALayer",
    "DoRA",
    "EncodedPrompt",
    "FromText",
    "Gaussian",
    "IntrinsicDimension",
    "IntrinsicLayer",
    "IntrinsicVector",
    "KaimingUniform",
    "LoRA",
    "LoRADrop",
    "LoRAFA",
    "LoRAInit",
    "LoRALayer",
    "MiLoRA",
    "OLoRA",
    "OLoRALayer",
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
    "ReLoRA",
    "ReLoRALayer",
    "SampledVocab",
    "TiedLoRA",
    "VBLoRA",
    "VBLoRALayer",
    "VeRA",
    "VectorBank",
    "VirtualTokens",
    "collect_covariance",
    "effective_rank",
    "randomized_svd",
]

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")
