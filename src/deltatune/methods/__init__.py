"""Registered methods: one file each, holding only the method's math and fields, grouped by family
(:mod:`.lowrank` on its base, :mod:`.prompts`, :mod:`.selective`; the bottleneck adapter and SAID
stand alone).

Every module of this package is imported when the package is, so a new method registers by its own
``@register`` line alone; the names below are the public API (``deltatune.LoRA``, ...).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .adapter import Adapter, AdapterLayer
from .intrinsic import IntrinsicDimension, IntrinsicLayer, IntrinsicVector
from .lowrank.adalora import AdaLoRA, AdaLoRALayer
from .lowrank.amlora import AMLoRA, AMLoRALayer
from .lowrank.base import Gaussian, KaimingUniform, LoRAInit
from .lowrank.delta_lora import DeltaLoRA, DeltaLoRALayer
from .lowrank.dora import DoRA
from .lowrank.lora import LoRA, LoRALayer
from .lowrank.lora_drop import LoRADrop
from .lowrank.lora_fa import LoRAFA
from .lowrank.olora import OLoRA, OLoRALayer
from .lowrank.pissa import CorDA, MiLoRA, PiSSA, collect_covariance, randomized_svd
from .lowrank.relora import ReLoRA, ReLoRALayer, effective_rank
from .lowrank.tied_lora import TiedLoRA
from .lowrank.vblora import VBLoRA, VBLoRALayer, VectorBank
from .lowrank.vera import VeRA
from .prompts.p_tuning import EncodedPrompt, PromptEncoder, PTuning
from .prompts.prefix_tuning import Prefixes, PrefixMLP, PrefixTuning
from .prompts.prompt_tuning import (
    FromText,
    PromptInit,
    PromptTuning,
    RandomUniform,
    SampledVocab,
    VirtualTokens,
)
from .selective.bitfit import BitFit, BitFitLayer
from .selective.partial import BlockCopy, Partial
from .selective.tokens import TokenRows, TokenRowsLayer, TrainableTokens

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
    "TokenRows",
    "TokenRowsLayer",
    "TrainableTokens",
    "VBLoRA",
    "VBLoRALayer",
    "VeRA",
    "VectorBank",
    "VirtualTokens",
    "collect_covariance",
    "effective_rank",
    "randomized_svd",
]

for _module in _pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
    _importlib.import_module(_module.name)
