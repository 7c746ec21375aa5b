"""LoRA+ optimizer groups (deltatune.parameter_groups): PEFT's create_loraplus_optimizer groups."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import require_peft_of_the_lock


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.classifier = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(self.lin(self.emb(x))))


def _ours(name: str) -> str:
    return name.replace(".adapters.default.module.", ".").replace(".adapters.default.", ".")


def _peft(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.lora_embedding_([AB])\.default$", r".lora_\1", name)
    name = re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1", name)
    return name.replace(".modules_to_save.default.", ".")


def _named(model: nn.Module, rename: object) -> dict[int, str]:
    return {id(p): rename(n) for n, p in model.named_parameters()}  # type: ignore[operator]


def test_groups_equal_peft_create_loraplus_optimizer() -> None:
    require_peft_of_the_lock("older create_loraplus_optimizer grouped embedding factors differently")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    ours = Toy()
    dt.inject(ours, dt.LoRA(rank=2), targets=["emb", "lin"], modules_to_save=["norm", "classifier"])
    theirs = peft.get_peft_model(
        Toy(), peft.LoraConfig(r=2, target_modules=["emb", "lin"], modules_to_save=["norm", "classifier"])
    )
    opt = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16, loraplus_weight_decay=0.01
    )
    groups = dt.parameter_groups(ours, 2e-4, loraplus_ratio=16, weight_decay=0.01)
    assert len(groups) == len(opt.param_groups) == 4
    our_names, their_names = _named(ours, _ours), _named(theirs, _peft)
    for mine, peft_group in zip(groups, opt.param_groups, strict=True):
        assert sorted(our_names[id(p)] for p in mine["params"]) == sorted(
            their_names[id(p)] for p in peft_group["params"]
        ), mine["name"]
        assert mine["lr"] == pytest.approx(peft_group["lr"])
        assert mine["weight_decay"] == peft_group["weight_decay"]
    by_name = {g["name"]: sorted(our_names[id(p)] for p in g["params"]) for g in groups}
    assert by_name == {
        "A": ["classifier.weight", "lin.lora_A"],
        "embedding": ["emb.lora_A", "emb.lora_B"],
        "B": ["lin.lora_B"],
        "B_no_decay": ["classifier.bias", "norm.bias", "norm.weight"],
    }
    torch.optim.SGD(groups).step()  # usable by any optimizer as is


def test_b_learns_ratio_times_faster_with_sgd() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6))
    dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    layer = dt.attachment_of(net).layers("default")["0"]
    with torch.no_grad():
        layer.lora_B.normal_()
    net(torch.randn(4, 6)).square().sum().backward()
    gA, gB = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    torch.optim.SGD(dt.parameter_groups(net, 0.1, loraplus_ratio=4.0)).step()
    torch.testing.assert_close(layer.lora_A.detach(), A0 - 0.1 * gA)
    torch.testing.assert_close(layer.lora_B.detach(), B0 - 0.4 * gB)


def test_without_ratio_one_group_of_trainable_parameters() -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    (group,) = dt.parameter_groups(net, 1e-3)
    assert {id(p) for p in group["params"]} == {id(p) for p in dt.trainable_parameters(net)}
    assert group["lr"] == 1e-3


@pytest.mark.parametrize("ratio", [0, -1.0, math.nan, math.inf, True, "16"])
def test_bad_ratio_is_a_clear_error(ratio: object) -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    with pytest.raises(ValueError, match="loraplus_ratio"):
        dt.parameter_groups(net, 1e-3, loraplus_ratio=ratio)  # type: ignore[arg-type]


def test_bad_lr_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lr"):
        dt.parameter_groups(nn.Linear(2, 2), math.nan, loraplus_ratio=16)
