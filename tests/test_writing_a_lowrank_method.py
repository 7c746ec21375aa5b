"""A new low-rank method built on the low-rank base, defined in this file alone, passes the invariant suite.

This is the second example of README's "Writing a method": LoRA-XS (Bałazy et al. 2024,
arXiv:2405.17604). The factors come from the truncated SVD of the frozen weight, ``B = U_r S_r`` and
``A = V_rᵀ``, and only a small ``r × r`` matrix ``R`` between them trains: ``ΔW = s · B R A``, ``r²``
parameters per module. ``R`` starts at zero, so the model equals the base at init; ``A`` and ``B`` are
recomputed from the base at load, so the file holds ``R`` alone. Everything else (``delta``,
``delta_weight``, the fused kernel's ``lowrank_factors``, the fields rank/alpha/dropout and ``scale``)
comes from the base.
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

from deltatune.contract import REGISTRY, LowRankLayer, Suite, register
from deltatune.methods.lowrank.base import ScaledLowRank, adapter_dtype, linear_like
from test_writing_a_method import INVARIANTS, PLAIN_TOYS


@dataclass(frozen=True, kw_only=True)
class LoRAXS(ScaledLowRank):
    """ΔW = s · (U_r S_r) R V_rᵀ with only the r × r matrix R trained (LoRA-XS)."""

    name: ClassVar[str] = "test_lora_xs"
    quantized_base: ClassVar[bool] = False  # the factors come from the float weight's SVD
    suite: ClassVar[Suite] = Suite(example={"rank": 2}, random_init=False)  # R = 0, A and B from W

    def wrap(
        self, base: nn.Module, shared: nn.Module | None, *, path: str, generator: torch.Generator
    ) -> XSLayer:
        kind, _, _ = linear_like(base, path, "LoRAXS", self.layer_types)
        weight = base.weight.detach().float()
        U, S, Vh = torch.linalg.svd(weight if kind == "linear" else weight.t(), full_matrices=False)
        r, dtype = self.rank, adapter_dtype(base)
        return XSLayer(kind, self.scale, self.dropout, (U[:, :r] * S[:r]).to(dtype), Vh[:r].to(dtype))

    def parameter_count(self, base: nn.Module) -> int:
        return self.rank * self.rank

    def stored_bytes(self, base: nn.Module) -> int:
        return self.parameter_count(base) * adapter_dtype(base).itemsize


class XSLayer(LowRankLayer):
    def __init__(self, kind: str, scale: float, dropout: float, B: torch.Tensor, A: torch.Tensor) -> None:
        super().__init__(kind, scale, dropout)
        self.R = nn.Parameter(torch.zeros(A.shape[0], A.shape[0], dtype=A.dtype))  # (r, r)
        self.register_buffer("A", A, persistent=False)  # V_rᵀ (r, in), rebuilt from the base at load
        self.register_buffer("B", B, persistent=False)  # U_r S_r (out, r)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.R @ self.A, self.B  # the update is s · B (R A)


@pytest.fixture
def registered() -> Iterator[type]:
    register(LoRAXS)
    try:
        yield LoRAXS
    finally:
        del REGISTRY[LoRAXS.name]


@pytest.mark.parametrize("toy", PLAIN_TOYS, ids=[t.name for t in PLAIN_TOYS])
@pytest.mark.parametrize("invariant", [f for _, f in INVARIANTS], ids=[n for n, _ in INVARIANTS])
def test_a_new_lowrank_method_passes_every_invariant(
    registered: type, invariant: Any, toy: Any, tmp_path: Path
) -> None:
    args: dict[str, Any] = {"cls": registered, "toy": toy}
    if "tmp_path" in inspect.signature(invariant).parameters:
        args["tmp_path"] = tmp_path
    invariant(**args)


def test_lora_xs_trains_r_squared_values_and_its_update_is_b_r_a(registered: type) -> None:
    import deltatune as dt

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    x = torch.randn(3, 6)
    att = dt.inject(net, LoRAXS(rank=2, alpha=4.0), targets=["0"])
    layer = att.layers("default")["0"]
    assert isinstance(layer, XSLayer)
    assert [p.shape for p in dt.trainable_parameters(net)] == [torch.Size([2, 2])]
    with torch.no_grad():
        layer.R.copy_(torch.randn(2, 2))
    base = net[0].base
    expected = base(x) + (4.0 / 2) * x @ (layer.B @ layer.R @ layer.A).t()
    torch.testing.assert_close(net(x), expected)
    U, S, Vh = torch.linalg.svd(base.weight.detach())
    torch.testing.assert_close(layer.B @ layer.A, (U[:, :2] * S[:2]) @ Vh[:2])  # the top-2 part of W


def test_lora_xs_exports_as_a_plain_lora_and_combines_with_no_more_code(
    registered: type, tmp_path: Path
) -> None:
    import deltatune as dt

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    x = torch.randn(3, 6)
    dt.inject(net, LoRAXS(rank=2, alpha=4.0), targets=["0"], name="a")
    dt.inject(net, LoRAXS(rank=2, alpha=4.0), targets=["0"], name="b", activate=False)
    with torch.no_grad():
        for name in ("a", "b"):
            dt.attachment_of(net).layers(name)["0"].R.copy_(torch.randn(2, 2))
    dt.export_lora(net, tmp_path / "xs", "a")
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(6, 5))
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "xs").eval()
    torch.testing.assert_close(loaded(x), net(x))
    dt.set_active(net, ["a", "b"])
    both = net(x)
    dt.combine(net, {"a": 1.0, "b": 1.0}, "ab")
    dt.set_active(net, "ab")
    torch.testing.assert_close(net(x), both)
