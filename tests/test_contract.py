"""The method contract: the defaults live in the base classes, methods depend only on the contract and
their family's base, and nothing registers by accident."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import ClassVar

import pytest
from torch import nn

import deltatune as dt
from deltatune.contract import REGISTRY, Method, hooks, register

METHODS_DIR = Path(dt.__file__).parent / "methods"


def test_every_register_line_in_methods_is_registered() -> None:
    """Every module of deltatune.methods is imported with the package: a method's ``@register``
    line is its whole registration (forgetting an import line cannot drop a method silently)."""
    declared = set()
    for file in METHODS_DIR.rglob("*.py"):
        text = file.read_text()
        for match in re.finditer(r"@register\s*\n(?:@[^\n]*\n)*class (\w+)", text):
            declared.add(match.group(1))
    assert declared, "no @register lines found"
    assert declared == {cls.__name__ for cls in REGISTRY.values()}


def test_the_defaults_are_the_base_classes_and_register_adds_nothing() -> None:
    hook_names = [n for n in dir(Method) if not n.startswith("_")]
    for cls in REGISTRY.values():
        assert issubclass(cls, Method), cls.__name__
        for hook in hook_names:
            assert hasattr(cls, hook), f"{cls.__name__}.{hook}"
    before = dict(vars(dt.LoRA))
    register(dt.LoRA)  # (already registered: the same class again is accepted and left as it is)
    assert dict(vars(dt.LoRA)) == before
    lora = hooks(dt.LoRA(rank=2))
    assert lora.default_targets(nn.Linear(2, 2)) is None  # no preference: Placement's default
    assert lora.quantized_base is True and lora.suite.example == {"rank": 4}  # the low-rank base's, its own
    assert hooks(dt.BitFit()).quantized_base is False  # Method's default
    assert "quantized_base" not in vars(dt.LoRA) and "combinable" in vars(dt.LoRA)


def test_methods_import_only_the_contract_and_their_family_base() -> None:
    """No method file imports the verbs (core), the wrapper, the state or merge helpers, a format or
    the harness: what a method may use is the contract, its family's base and model facts."""
    verbs = re.compile(
        r"^\s*from \.+(core|wrapper|state|merged|compose|io|peft|formats|train|cli\w*|quant)\b", re.M
    )
    for file in METHODS_DIR.rglob("*.py"):
        assert not verbs.findall(file.read_text()), file.name


def test_the_low_rank_fields_are_declared_once() -> None:
    """rank, alpha, dropout and rank_stabilized are fields of the low-rank base only."""
    declared = {
        f"{file.name}:{m.group(1)}"
        for file in METHODS_DIR.rglob("*.py")
        for m in re.finditer(r"^    (rank|alpha|rank_stabilized): \w+ = param\(", file.read_text(), re.M)
    }
    assert declared == {"base.py:rank", "base.py:alpha", "base.py:rank_stabilized", "adalora.py:alpha"}
    assert dt.VeRA().rank == 256 and dt.VBLoRA().rank == 4 and dt.LoRA().rank == 8  # defaults per method
    assert dt.TiedLoRA(rank=4, alpha=8, rank_stabilized=True).scale == 4.0  # one scale for the family


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


def test_register_refuses_what_is_not_a_method() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Plain:
        name: ClassVar[str] = "test_plain"

    with pytest.raises(ValueError, match="must subclass deltatune.contract.Method"):
        register(Plain)  # type: ignore[type-var]

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Nameless(Method):
        pass

    with pytest.raises(ValueError, match="must declare its own name"):
        register(Nameless)
    with pytest.raises(TypeError):  # a mutable method cannot even be declared on the frozen base

        @dataclasses.dataclass(kw_only=True)
        class Mutable(Method):
            name: ClassVar[str] = "test_mutable"

    assert "test_plain" not in REGISTRY and "test_mutable" not in REGISTRY
