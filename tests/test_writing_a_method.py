"""A complete new method, defined and registered from this test file alone, passes the invariant suite.

This is the example of README's "Writing a method": a learned bias on the output of Linear layers
(BitFit for layers without a bias), mergeable into the weights' bias. Nothing outside this file
names it: it registers with ``@register`` and every invariant of tests/test_invariants.py runs on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import test_invariants
from deltatune.contract import REGISTRY, AdditiveLayer, Method, Suite, register
from deltatune.contract.fields import Float, param
from toy_models import TOYS


@dataclass(frozen=True, kw_only=True)
class OutputShift(Method):
    """A trainable vector added to a Linear layer's output: y = W x + b + s.

    Fields:
        init: the value every entry of s starts at [0.0: the model is unchanged at first].
    """

    init: float = param(0.0, Float(), "starting value of the shift")

    name: ClassVar[str] = "test_output_shift"
    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    supports_mixed_batch: ClassVar[bool] = True
    suite: ClassVar[Suite] = Suite(random_init=False)  # s starts at `init` whatever the seed

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> Shift:
        return Shift(base.out_features, self.init, base.weight.dtype)

    def parameter_count(self, base: nn.Module) -> int:
        return int(base.out_features)

    def stored_bytes(self, base: nn.Module) -> int:
        return 4 * int(base.out_features)


class Shift(AdditiveLayer):
    reads: ClassVar[str] = "output"  # only its shape matters: the shift does not depend on x

    def __init__(self, width: int, init: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.full((width,), init, dtype=torch.promote_types(dtype, torch.float32)))

    def delta(self, y: torch.Tensor) -> torch.Tensor:
        return self.shift.expand_as(y)

    def merged(self, base: nn.Module) -> nn.Module:
        out = nn.Linear(base.in_features, base.out_features, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight)
            bias = base.bias if base.bias is not None else torch.zeros_like(self.shift)
            out.bias.copy_((bias.float() + self.shift.float()).to(out.bias.dtype))
        out.requires_grad_(False)
        return out


@pytest.fixture
def registered() -> Iterator[type]:
    register(OutputShift)
    try:
        yield OutputShift
    finally:
        del REGISTRY[OutputShift.name]


INVARIANTS = [
    (name, fn)
    for name, fn in vars(test_invariants).items()
    if name.startswith("test_") and list(inspect.signature(fn).parameters)[:2] == ["cls", "toy"]
]
PLAIN_TOYS = [t for t in TOYS if not t.transformers and not t.name.endswith("nf4")]


@pytest.mark.parametrize("toy", PLAIN_TOYS, ids=[t.name for t in PLAIN_TOYS])
@pytest.mark.parametrize("invariant", [f for _, f in INVARIANTS], ids=[n for n, _ in INVARIANTS])
def test_a_new_method_passes_every_invariant(
    registered: type, invariant: Any, toy: Any, tmp_path: Path
) -> None:
    args: dict[str, Any] = {"cls": registered, "toy": toy}
    if "tmp_path" in inspect.signature(invariant).parameters:
        args["tmp_path"] = tmp_path
    invariant(**args)


def test_the_suite_is_not_empty_and_the_method_is_unregistered_afterwards() -> None:
    assert len(INVARIANTS) >= 14
    assert OutputShift.name not in REGISTRY
