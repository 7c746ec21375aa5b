"""On a CUDA GPU: the fused low-rank kernel, the precision policy and routed adapters match their
references in float32 and bf16. Skipped without a GPU (``pytest -m cuda`` on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import deltatune as dt
from deltatune.kernels.lowrank import lowrank_linear

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_equals_the_plain_form(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 96).to("cuda", dtype).requires_grad_(False)
    x = torch.randn(4, 16, 64, device="cuda", dtype=dtype, requires_grad=True)
    A = torch.randn(8, 64, device="cuda", dtype=dtype, requires_grad=True)
    B = torch.randn(96, 8, device="cuda", dtype=dtype, requires_grad=True)
    fused = lowrank_linear(base, x, A, B, 0.5)
    grads = torch.autograd.grad(fused.float().square().sum(), (x, A, B))
    plain = base(x) + 0.5 * (x @ A.t()) @ B.t()
    expected = torch.autograd.grad(plain.float().square().sum(), (x, A, B))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(fused.float(), plain.float(), atol=tol, rtol=tol)
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g.float(), e.float(), atol=tol * 10, rtol=tol)


def test_bf16_lora_is_within_rounding_of_float32_and_keeps_bf16_activations() -> None:
    model = llama(torch.bfloat16)
    dt.inject(model, dt.LoRA(rank=8, alpha=16), targets=TARGETS)
    with torch.no_grad():
        for layer in dt.attachment_of(model).layers("default").values():
            layer.lora_B.normal_(0, 0.02)
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    wide: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float32 and t.dim() >= 2 and t.shape[0] in (2, 64) and t.shape[-1] >= 64:
            wide.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids).logits
    with dt.adapter_precision_as("adapter"):
        reference = model(input_ids=ids).logits
    assert not [s for s in wide if s[-1] != 256]  # (the model's own float32 logits/RMSNorm apart)
    assert torch.allclose(logits.float(), reference.float(), atol=5e-2, rtol=5e-2)


def test_routed_adapters_equal_each_row_alone_on_the_gpu() -> None:
    model = llama(torch.bfloat16).eval()
    for i in range(3):
        dt.inject(model, dt.LoRA(rank=4), targets=TARGETS, name=f"a{i}", seed=i)
        with torch.no_grad():
            for layer in dt.attachment_of(model).layers(f"a{i}").values():
                layer.lora_B.normal_(0, 0.05)
    ids = torch.randint(0, 256, (6, 16), device="cuda")
    names = ["a0", "a1", "a2", None, "a1", "a0"]
    with torch.inference_mode():
        with dt.route(model, names):
            mixed = model(input_ids=ids).logits
        for i, name in enumerate(names):
            if name is None:
                with dt.disabled(model):
                    alone = model(input_ids=ids[i : i + 1]).logits
            else:
                dt.set_active(model, name)
                alone = model(input_ids=ids[i : i + 1]).logits
            assert torch.allclose(mixed[i : i + 1].float(), alone.float(), atol=3e-2, rtol=3e-2)
