"""Registered methods: one file each, holding only the method's math."""

from .adapter import Adapter, AdapterLayer
from .bitfit import BitFit, BitFitLayer
from .intrinsic import IntrinsicDimension, IntrinsicLayer, IntrinsicVector
from .lora import Gaussian, KaimingUniform, LoRA, LoRAInit, LoRALayer
from .partial import BlockCopy, Partial
from .vblora import VBLoRA, VBLoRALayer, VectorBank

__all__ = [
    "Adapter",
    "AdapterLayer",
    "BitFit",
    "BitFitLayer",
    "BlockCopy",
    "Gaussian",
    "IntrinsicDimension",
    "IntrinsicLayer",
    "IntrinsicVector",
    "KaimingUniform",
    "LoRA",
    "LoRAInit",
    "LoRALayer",
    "Partial",
    "VBLoRA",
    "VBLoRALayer",
    "VectorBank",
]
