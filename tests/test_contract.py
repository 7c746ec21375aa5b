"""The method contract: registration fills every optional hook, and nothing registers by accident."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import ClassVar

import pytest
from torch import nn

import deltatune as dt
from deltatune.contract import HOOK_DEFAULTS, REGISTRY, hooks, register

METHODS_DIR = Path(dt.__file__).parent / "methods"


def test_every_register_line_in_methods_is_registered() -> None:
    """Every module of deltatune.methods is imported with the package: a method's ``@register``
    line is its whole registration (forgetting an import line cannot drop a method silently)."""
    declared = set()
    for file in METHODS_DIR.glob("*.py"):
        text = file.read_text()
        for match in re.finditer(r"@register\s*\n(?:@[^\n]*\n)*class (\w+)", text):
            declared.add(match.group(1))
    assert declared, "no @register lines found"
    assert declared == {cls.__name__ for cls in REGISTRY.values()}


def test_register_fills_every_hook_and_keeps_the_methods_own() -> None:
    for cls in REGISTRY.values():
        for hook in HOOK_DEFAULTS:
            assert hasattr(cls, hook), f"{cls.__name__}.{hook}"
    lora = hooks(dt.LoRA(rank=2))
    assert lora.default_targets(nn.Linear(2, 2)) is None  # no preference
    assert lora.quantized_base is True and lora.small_example == {"rank": 4}  # its own values
    assert hooks(dt.BitFit()).quantized_base is False  # the default


def test_methods_know_nothing_of_peft() -> None:
    """PEFT translation lives in deltatune.formats.peft, which names the methods it writes."""
    from deltatune.formats.peft import BY_METHOD, TRANSLATORS, peft_type_of

    for cls in REGISTRY.values():
        assert not [a for a in dir(cls) if a.startswith(("peft_", "from_peft", "to_peft"))], cls.__name__
    assert set(BY_METHOD) <= set(REGISTRY)
    assert {t.peft_type for t in BY_METHOD.values()} == set(TRANSLATORS)
    assert peft_type_of(dt.DoRA()) == peft_type_of(dt.LoRA()) == "LORA"
    assert peft_type_of(dt.BitFit()) is None


def test_hooks_refuses_what_is_not_registered() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Unregistered:
        name: ClassVar[str] = "lora"  # even under a registered name

    with pytest.raises(ValueError, match="registered deltatune method config"):
        hooks(Unregistered())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered deltatune method config"):
        dt.inject(nn.Linear(2, 2), "lora", targets=[""])  # type: ignore[arg-type]


def test_register_refuses_incomplete_or_mutable_classes() -> None:
    @dataclasses.dataclass(kw_only=True)
    class Mutable:
        name: ClassVar[str] = "test_mutable"

    with pytest.raises(ValueError, match="must be a frozen dataclass"):
        register(Mutable)  # type: ignore[type-var]

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NoCapabilities:
        name: ClassVar[str] = "test_no_capabilities"

    with pytest.raises(ValueError, match=r"must declare the class attributes \['mergeable'"):
        register(NoCapabilities)  # type: ignore[type-var]
    assert "test_mutable" not in REGISTRY and "test_no_capabilities" not in REGISTRY
