"""llama.cpp's files (deltatune.formats.gguf): a model GGUF that transformers reads back as the same
model, and a LoRA GGUF that, applied as llama.cpp applies it (``W + alpha/r · B A`` on the GGUF
tensors), gives the GGUF of our merged model. The run in llama.cpp itself is
tests/test_llama_cpp.py (slow: it needs llama-cpp-python)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import deltatune as dt
from deltatune.formats.gguf import export_gguf_lora, export_gguf_model
from toy_models import llama_lm

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

IDS = torch.tensor([[1, 5, 9, 33, 2, 17], [4, 4, 8, 15, 16, 23]])
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def read_back(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float64).reshape([int(n) for n in reversed(t.shape)])
    return out


def adapted(**fields: Any) -> Any:
    model = llama_lm(64, 32, seed=0).eval()
    dt.inject(model, dt.LoRA(rank=4, **fields), targets=LINEAR, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def test_a_model_written_as_gguf_reads_back_as_the_same_model(tmp_path: Path) -> None:
    model = llama_lm(64, 32, seed=0).eval()
    path = export_gguf_model(model, tmp_path / "base-f32.gguf", dtype="f32")
    assert (logits(read_back(path)) - logits(model)).abs().max() <= 1e-5
    half = export_gguf_model(model, tmp_path / "base-f16.gguf", dtype="f16")
    assert (logits(read_back(half)) - logits(model)).abs().max() <= 1e-2
    q8 = export_gguf_model(model, tmp_path / "base-q8.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q8)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert (logits(read_back(q8)) - logits(model)).abs().max() <= 5e-2


@pytest.mark.parametrize("fields", [{}, {"rank_stabilized": True, "alpha": 8.0}], ids=["lora", "rslora"])
def test_the_lora_file_applied_as_llama_cpp_does_gives_our_merged_model(
    fields: dict[str, Any], tmp_path: Path
) -> None:
    model = adapted(**fields)
    base = copy.deepcopy(model)
    dt.unload(base)
    export_gguf_model(base, tmp_path / "base.gguf", dtype="f32")
    report = export_gguf_lora(model, tmp_path / "lora.gguf")
    merged = export_gguf_model(model, tmp_path / "merged.gguf", dtype="f32")
    assert dt.has_adapters(model)  # the export merged a copy
    reader = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    lora, W, want = tensors(tmp_path / "lora.gguf"), tensors(tmp_path / "base.gguf"), tensors(merged)
    assert len(lora) == 2 * 2 * len(LINEAR) and set(report.ranks.values()) == {4}
    for name in (k.removesuffix(".lora_a") for k in lora if k.endswith(".lora_a")):
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        applied = W[name] + (alpha / a.shape[0]) * (b @ a)  # llama.cpp: scale = alpha / rank
        assert np.abs(applied - want[name]).max() <= 1e-5, name
    # ... and that merged file is our adapted model, read back by transformers.
    assert (logits(read_back(merged)) - logits(model)).abs().max() <= 1e-4


def test_modules_of_other_scales_fold_them_into_b(tmp_path: Path) -> None:
    model = llama_lm(64, 32, seed=0).eval()
    dt.inject(model, dt.LoRA(rank=4), targets=LINEAR, seed=0, overrides={"o_proj": {"rank": 2, "alpha": 7.0}})
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    base = copy.deepcopy(model)
    dt.unload(base)
    export_gguf_model(base, tmp_path / "base.gguf", dtype="f32")
    export_gguf_lora(model, tmp_path / "lora.gguf")
    merged = export_gguf_model(model, tmp_path / "merged.gguf", dtype="f32")
    alpha = float(gguf.GGUFReader(str(tmp_path / "lora.gguf")).fields["adapter.lora.alpha"].contents())
    lora, W, want = tensors(tmp_path / "lora.gguf"), tensors(tmp_path / "base.gguf"), tensors(merged)
    for name in (k.removesuffix(".lora_a") for k in lora if k.endswith(".lora_a")):
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        assert np.abs(W[name] + (alpha / a.shape[0]) * (b @ a) - want[name]).max() <= 1e-5, name


def test_what_llama_cpp_cannot_hold_is_refused(tmp_path: Path) -> None:
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    gpt2 = transformers.GPT2LMHeadModel(config)
    dt.inject(gpt2, dt.LoRA(rank=2), targets=["c_attn"])
    with pytest.raises(ValueError, match="Llama-family.*convert_lora_to_gguf"):
        export_gguf_lora(gpt2, tmp_path / "gpt2.gguf")
    model = llama_lm(64, 32, seed=0)
    dt.inject(model, dt.LoRA(rank=2), targets=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="saves whole modules.*gguf-merged"):
        export_gguf_lora(model, tmp_path / "heads.gguf")
    model = llama_lm(64, 32, seed=0)
    dt.inject(model, dt.LoRA(rank=2), targets=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match="embedding"):
        export_gguf_lora(model, tmp_path / "embed.gguf")
    model = llama_lm(64, 32, seed=0)
    dt.inject(model, dt.DoRA(rank=2), targets=["q_proj"])
    with pytest.raises(ValueError, match="not a low-rank update"):
        export_gguf_lora(model, tmp_path / "dora.gguf")
    (tmp_path / "taken.gguf").write_text("x")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        export_gguf_model(llama_lm(64, 32, seed=0), tmp_path / "taken.gguf", overwrite=False)
    assert (tmp_path / "taken.gguf").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]  # nothing half-written
