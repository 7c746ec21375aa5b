"""Registered methods: one file each, holding only the method's math."""

from .lora import Gaussian, KaimingUniform, LoRA, LoRAInit, LoRALayer
from .vblora import VBLoRA, VBLoRALayer, VectorBank

__all__ = [
    "Gaussian",
    "KaimingUniform",
    "LoRA",
    "LoRAInit",
    "LoRALayer",
    "VBLoRA",
    "VBLoRALayer",
    "VectorBank",
]
