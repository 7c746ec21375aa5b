"""deltatune: parameter-efficient fine-tuning with one small core and one file per method.

>>> from deltatune import LoRA, inject, merge, unload, disabled, save, load
"""

from . import (
    _quiet,  # noqa: F401  (filters two import-time messages of torchao; see _quiet)
    continual,
)
from .arithmetic import combine
from .contract import REGISTRY, register
from .formats.gguf import export_gguf_lora, export_gguf_model
from .formats.hf import export_merged
from .formats.io import load, save
from .formats.lora import export_lora
from .formats.peft.convert import export_peft, import_peft
from .kernels.lowrank import adapter_precision, adapter_precision_as
from .methods import (
    AdaLoRA,
    Adapter,
    AMLoRA,
    BitFit,
    CorDA,
    DeltaLoRA,
    DoRA,
    Gaussian,
    IntrinsicDimension,
    KaimingUniform,
    LoRA,
    LoRADrop,
    LoRAFA,
    MiLoRA,
    OLoRA,
    Partial,
    PiSSA,
    PrefixTuning,
    PromptTuning,
    PTuning,
    ReLoRA,
    TiedLoRA,
    TrainableTokens,
    VBLoRA,
    VeRA,
    collect_covariance,
)
from .runtime.checkpointing import checkpoint_blocks
from .runtime.compose import reconfigure
from .runtime.core import (
    delete_adapter,
    disabled,
    inject,
    merge,
    route,
    set_active,
    set_adapter_precision,
    trainable_parameters,
    unload,
)
from .runtime.loraplus import parameter_groups as parameter_groups  # LoRA+ and plain optimizer groups
from .runtime.regional import compile
from .runtime.state import ParameterReport, adapter_state, parameter_report
from .runtime.stepping import lr_factor, needs_step_hooks, on_step, regularization
from .runtime.wrapper import Adapted, Attachment, attachment_of, has_adapters
from .targets import ALL_LINEAR, Target

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR",
    "REGISTRY",
    "AMLoRA",
    "AdaLoRA",
    "Adapted",
    "Adapter",
    "Attachment",
    "BitFit",
    "CorDA",
    "DeltaLoRA",
    "DoRA",
    "Gaussian",
    "IntrinsicDimension",
    "KaimingUniform",
    "LoRA",
    "LoRADrop",
    "LoRAFA",
    "MiLoRA",
    "OLoRA",
    "PTuning",
    "ParameterReport",
    "Partial",
    "PiSSA",
    "PrefixTuning",
    "PromptTuning",
    "ReLoRA",
    "Target",
    "TiedLoRA",
    "TrainableTokens",
    "VBLoRA",
    "VeRA",
    "adapter_precision",
    "adapter_precision_as",
    "adapter_state",
    "attachment_of",
    "checkpoint_blocks",
    "collect_covariance",
    "combine",
    "compile",
    "continual",
    "delete_adapter",
    "disabled",
    "export_gguf_lora",
    "export_gguf_model",
    "export_lora",
    "export_merged",
    "export_peft",
    "has_adapters",
    "import_peft",
    "inject",
    "load",
    "lr_factor",
    "merge",
    "needs_step_hooks",
    "on_step",
    "parameter_groups",
    "parameter_report",
    "reconfigure",
    "register",
    "regularization",
    "route",
    "save",
    "set_active",
    "set_adapter_precision",
    "trainable_parameters",
    "unload",
]
