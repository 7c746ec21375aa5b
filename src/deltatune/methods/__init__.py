"""Registered methods: one file each, holding only the method's math."""

from .lora import Gaussian, KaimingUniform, LoRA, LoRAInit, LoRALayer

__all__ = ["Gaussian", "KaimingUniform", "LoRA", "LoRAInit", "LoRALayer"]
