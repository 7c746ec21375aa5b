"""LoRA-FA: A frozen at its random init, only B trains, and autograd keeps A x (r wide), not x."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.lowrank.lora_fa import LoRAFA, LoRAFALayer

IN, OUT, R, TOKENS = 64, 48, 4, 10


def _net(method: object, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN, IN), nn.Linear(IN, OUT))
    for p in net.parameters():
        p.requires_grad_(False)
    dt.inject(net, method, targets=["1"], seed=seed)  # type: ignore[arg-type]
    return net, dt.attachment_of(net).layers("default")["1"]


def _saved_activations(net: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the activations (not weights) autograd saves while the adapted layer (net[1]) runs."""
    h = net[0](x).relu()  # an in-wide activation that needs a gradient (as in a real model)
    weights = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers()]}
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net[1](h).sum().backward()
    return shapes


def test_saves_the_rank_r_product_not_the_input() -> None:
    x = torch.randn(2, TOKENS, IN, requires_grad=True)
    net, _ = _net(LoRAFA(rank=R))
    net.train()
    assert _saved_activations(net, x) == [(2 * TOKENS, R)]  # h = A x, r values per token; never x
    # LoRA, for contrast, keeps the in-wide input for A's gradient (its fused kernel saves x and h).
    lora, _ = _net(dt.LoRA(rank=R))
    assert (2 * TOKENS, IN) in _saved_activations(lora, x)


def test_only_b_trains_and_a_is_lora_s_init() -> None:
    net, layer = _net(LoRAFA(rank=R, alpha=8), seed=3)
    _, lora_layer = _net(dt.LoRA(rank=R, alpha=8), seed=3)
    assert isinstance(layer, LoRAFALayer)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_B"]
    assert "lora_A" in dict(layer.named_buffers()) and "lora_A" in layer.state_dict()
    torch.testing.assert_close(layer.lora_A, lora_layer.lora_A)  # Kaiming-uniform from the same seed
    assert torch.count_nonzero(layer.lora_B) == 0
    assert dt.attachment_of(net).closed_form("default") == (R * OUT, 4 * R * (IN + OUT))


def test_b_gradient_and_output_equal_lora_with_frozen_a() -> None:
    net, layer = _net(LoRAFA(rank=R, alpha=6, rank_stabilized=True), seed=1)
    ref, ref_layer = _net(dt.LoRA(rank=R, alpha=6, rank_stabilized=True), seed=1)
    with torch.no_grad():
        layer.lora_B.normal_()
        ref_layer.lora_B.copy_(layer.lora_B)
    x = torch.randn(3, TOKENS, IN)
    y, y_ref = net(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(layer.lora_B.grad, ref_layer.lora_B.grad)
    with torch.no_grad():
        torch.testing.assert_close(net(x), y.detach())
    # The fused kernel serves LoRA-FA while training too: it keeps x only for a trainable A.
    assert layer.lowrank_factors() is not None


def test_a_stays_frozen_through_training_and_merge_is_exact() -> None:
    net, layer = _net(LoRAFA(rank=R))
    A0 = layer.lora_A.clone()
    opt = torch.optim.SGD(dt.trainable_parameters(net), lr=0.1)
    x = torch.randn(8, IN)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    assert torch.equal(layer.lora_A, A0) and torch.count_nonzero(layer.lora_B) > 0
    before = net(x).detach()
    dt.merge(net)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def test_refuses_embeddings() -> None:
    with pytest.raises(ValueError, match="emb"):
        dt.inject(nn.ModuleDict({"emb": nn.Embedding(5, 4)}), LoRAFA(rank=2), targets=["emb"])


@pytest.mark.parametrize("fields", [{"rank": 0}, {"alpha": 0.0}, {"dropout": 1.0}])
def test_bad_fields_name_the_field(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        LoRAFA(**fields)  # type: ignore[arg-type]
