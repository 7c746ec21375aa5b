"""PEFT's prompt tuning, P-tuning and prefix tuning files, both ways, with PEFT as the oracle.

A BERT sequence classifier (PEFT adds its classifier as ``modules_to_save``) and a Llama causal LM,
built from configs. Files PEFT saves load here with the outputs PEFT computes from them; ours load in
``PeftModel.from_pretrained`` with our outputs. Where PEFT's own forward refuses the installed
transformers (prefix tuning on BERT from transformers 5.24), its path is run by hand, as in
``test_prompts.peft_prefix_logits``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.formats.peft import peft_type_of
from test_prompts import N, batch, bert, llama, peft_prefix_logits

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "bert": (bert, "SEQ_CLS"),
    "llama": (llama, "CAUSAL_LM"),
}
PEFT_CONFIGS: dict[str, Callable[[str], Any]] = {
    "prompt": lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N),
    "ptuning-mlp": lambda task: peft.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=N, encoder_hidden_size=8, encoder_reparameterization_type="MLP"
    ),
    "ptuning-lstm": lambda task: peft.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=N, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
    ),
    "prefix-mlp": lambda task: peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=8
    ),
    "prefix-plain": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N),
}
OURS: dict[str, Any] = {
    "prompt": dt.PromptTuning(num_virtual_tokens=N),
    "ptuning-mlp": dt.PTuning(num_virtual_tokens=N, encoder="mlp", encoder_hidden_size=8),
    "ptuning-lstm": dt.PTuning(num_virtual_tokens=N, encoder_hidden_size=8),
    "prefix-mlp": dt.PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8, positions="after_prefix"),
    "prefix-plain": dt.PrefixTuning(num_virtual_tokens=N, reparameterize=False, positions="after_prefix"),
}
CASES = [(m, k) for m in MODELS for k in PEFT_CONFIGS]
IDS = [f"{m}-{k}" for m, k in CASES]


def inputs(model: str) -> dict[str, torch.Tensor]:
    b = batch()
    if model == "llama":
        b.pop("token_type_ids")
    return b


def peft_logits(peft_model: Any, model: str, kind: str) -> torch.Tensor:
    """PEFT's logits, one per real token (PEFT's causal LM also returns the n virtual positions of
    prompt tuning and P-tuning: they are dropped, as deltatune never returns them)."""
    b = inputs(model)
    with torch.no_grad():
        if model == "bert" and kind.startswith("prefix"):
            return peft_prefix_logits(peft_model, b)
        logits: torch.Tensor = peft_model(**b).logits
    return logits[:, N:] if model == "llama" and not kind.startswith("prefix") else logits


def our_logits(ours: nn.Module, model: str) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = ours(**inputs(model)).logits
        return logits


@pytest.mark.parametrize(("model", "kind"), CASES, ids=IDS)
def test_peft_files_load_with_peft_outputs(model: str, kind: str, tmp_path: Path) -> None:
    make, task = MODELS[model]
    trained = peft.get_peft_model(make(), PEFT_CONFIGS[kind](task))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "modules_to_save" in name:  # the classifier PEFT trains along (SEQ_CLS)
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    trained.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    expected = peft_logits(theirs, model, kind)

    ours = make()
    att = dt.import_peft(ours, tmp_path)
    assert torch.allclose(our_logits(ours, model), expected, atol=1e-5)
    method = att.info("default").method
    assert type(method) is type(OURS[kind])
    if kind.startswith("prefix"):
        assert method.positions == "after_prefix"  # PEFT's positions (see the README)
    assert list(att.info("default").modules_to_save) == (["classifier"] if model == "bert" else [])
    # Saved in deltatune's own format, it loads with the same outputs.
    dt.save(ours, tmp_path / "ours")
    again = make()
    dt.load(again, tmp_path / "ours")
    assert torch.equal(our_logits(again, model), our_logits(ours, model))


@pytest.mark.parametrize(("model", "kind"), CASES, ids=IDS)
def test_our_adapters_load_in_peft_with_our_outputs(model: str, kind: str, tmp_path: Path) -> None:
    make, task = MODELS[model]
    ours = make()
    save = ["classifier"] if model == "bert" else []
    dt.inject(ours, OURS[kind], modules_to_save=save, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in dt.trainable_parameters(ours):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    expected = our_logits(ours, model)
    dt.export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == task  # read off the model: PEFT runs prompts only in a task model
    assert config["peft_type"] == peft_type_of(OURS[kind])
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert torch.allclose(peft_logits(theirs, model, kind), expected, atol=1e-5)


def test_peft_ptuning_file_holds_the_encoder_output(tmp_path: Path) -> None:
    """PEFT saves what the prompt encoder computes (n x d), never the LSTM or MLP: the same as
    deltatune's P-tuning file, so importing needs no encoder."""
    trained = peft.get_peft_model(bert(), PEFT_CONFIGS["ptuning-lstm"]("SEQ_CLS"))
    trained.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k for k in stored if not k.startswith("base_model.classifier.")} == {"prompt_embeddings"}
    encoder = trained.prompt_encoder["default"]
    with torch.no_grad():
        output = encoder(torch.arange(N).unsqueeze(0))[0]
    assert torch.allclose(stored["prompt_embeddings"], output)


def test_prefix_positions_decide_what_exports(tmp_path: Path) -> None:
    model = llama()
    att = dt.inject(model, dt.PrefixTuning(num_virtual_tokens=N, reparameterize=False))
    with pytest.raises(ValueError, match="positions='after_prefix'"):
        dt.export_peft(model, tmp_path / "base")
    # The two conventions differ in the outputs, not only in the file.
    layer = att.layers("default")["model"]
    shifted = llama()
    other = dt.inject(
        shifted, dt.PrefixTuning(num_virtual_tokens=N, reparameterize=False, positions="after_prefix")
    )
    with torch.no_grad():
        other.layers("default")["model"].prefixes.copy_(layer.prefixes)
    b = inputs("llama")
    assert not torch.allclose(our_logits(model, "llama"), our_logits(shifted, "llama"), atol=1e-4)
    explicit = torch.arange(N, N + 5).expand(2, 5)  # "after_prefix" is positions n, n+1, ...
    with torch.no_grad():
        assert torch.allclose(model(**b, position_ids=explicit).logits, shifted(**b).logits, atol=1e-6)


def test_what_peft_cannot_express_is_refused(tmp_path: Path) -> None:
    model = bert()
    dt.inject(model, dt.PromptTuning(num_virtual_tokens=N, insert_at=1))
    with pytest.raises(ValueError, match="insert_at=1"):
        dt.export_peft(model, tmp_path / "a")
    masked = transformers.BertForMaskedLM(bert().config)  # PEFT has no task type for it
    dt.inject(masked, dt.PromptTuning(num_virtual_tokens=N))
    with pytest.raises(ValueError, match="pass task_type="):
        dt.export_peft(masked, tmp_path / "c")
    dt.export_peft(masked, tmp_path / "c", task_type="FEATURE_EXTRACTION")  # the caller's
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no transformers body"):
        dt.import_peft(net, tmp_path / "c")
    assert not dt.has_adapters(net)


@pytest.mark.parametrize("kind", ["prompt", "ptuning-mlp", "prefix-plain"])
def test_a_classifier_whose_head_was_not_saved_exports_what_peft_needs(kind: str, tmp_path: Path) -> None:
    """PEFT's SEQ_CLS prompt learning reads the classifier from the file (KeyError otherwise): the
    export writes the model's own head, so PEFT loads it and gives our outputs."""
    ours = bert()
    dt.inject(ours, OURS[kind], seed=3)  # no modules_to_save: the head stays the base's
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in dt.trainable_parameters(ours):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    expected = our_logits(ours, "bert")
    dt.export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    theirs = peft.PeftModel.from_pretrained(bert(), tmp_path).eval()
    assert torch.allclose(peft_logits(theirs, "bert", kind), expected, atol=1e-5)
    assert not dt.attachment_of(ours).info("default").modules_to_save  # ours is unchanged
