"""deltatune: parameter-efficient fine-tuning with one small core and one file per method.

>>> from deltatune import LoRA, inject, merge, unload, disabled, save, load
"""

from . import _quiet  # noqa: F401  (filters two import-time messages of torchao; see _quiet)
from .core import (
    REGISTRY,
    Adapted,
    Attachment,
    ParameterReport,
    adapter_state,
    attachment_of,
    combine,
    delete_adapter,
    disabled,
    has_adapters,
    inject,
    merge,
    parameter_report,
    register,
    route,
    set_active,
    trainable_parameters,
    unload,
)
from .io import load, save
from .loraplus import parameter_groups as parameter_groups  # LoRA+ and plain optimizer groups
from .methods import (
    Adapter,
    BitFit,
    CorDA,
    DoRA,
    Gaussian,
    IntrinsicDimension,
    KaimingUniform,
    LoRA,
    LoRAFA,
    MiLoRA,
    Partial,
    PiSSA,
    PrefixTuning,
    PromptTuning,
    PTuning,
    TiedLoRA,
    VBLoRA,
    VeRA,
    collect_covariance,
)
from .peft import export_peft, import_peft
from .targets import ALL_LINEAR, Target

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR",
    "REGISTRY",
    "Adapted",
    "Adapter",
    "Attachment",
    "BitFit",
    "CorDA",
    "DoRA",
    "Gaussian",
    "IntrinsicDimension",
    "KaimingUniform",
    "LoRA",
    "LoRAFA",
    "MiLoRA",
    "PTuning",
    "ParameterReport",
    "Partial",
    "PiSSA",
    "PrefixTuning",
    "PromptTuning",
    "Target",
    "TiedLoRA",
    "VBLoRA",
    "VeRA",
    "adapter_state",
    "attachment_of",
    "collect_covariance",
    "combine",
    "delete_adapter",
    "disabled",
    "export_peft",
    "has_adapters",
    "import_peft",
    "inject",
    "load",
    "merge",
    "parameter_report",
    "register",
    "route",
    "save",
    "set_active",
    "trainable_parameters",
    "unload",
]
