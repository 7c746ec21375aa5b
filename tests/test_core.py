"""Core behaviour that is not per-method: target selection, files, errors, modules_to_save."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import Target
from deltatune.methods.lowrank.lora import LoRA
from deltatune.runtime.wrapper import attachment_of
from deltatune.targets import QUERY_VALUE, default_targets, resolve
from toy_models import TOYS, GPT2Style

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def blocks() -> nn.Module:
    return TOYS[1].build()


# -- targets -----------------------------------------------------------------------------------


def test_target_by_suffix_exact_regex_type_and_layer() -> None:
    model = blocks()
    assert resolve(model, "q_proj") == ["layers.0.q_proj", "layers.1.q_proj"]
    assert resolve(model, "layers.1.q_proj") == ["layers.1.q_proj"]
    assert resolve(model, ["1.q_proj", "v_proj"]) == ["layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert resolve(model, re.compile(r".*\.[qk]_proj")) == [
        "layers.0.q_proj",
        "layers.0.k_proj",
        "layers.1.q_proj",
        "layers.1.k_proj",
    ]
    assert resolve(model, nn.LayerNorm) == ["layers.0.norm", "layers.1.norm"]
    assert resolve(model, Target(types=(nn.Linear,), layers=(1,), exclude=("o_proj",))) == [
        "layers.1.q_proj",
        "layers.1.k_proj",
        "layers.1.v_proj",
    ]
    assert resolve(model, Target(names=("v_proj",), pattern=r"layers\.0\..*")) == ["layers.0.v_proj"]
    # "proj" is not a suffix at a module boundary: no partial-word matches.
    with pytest.raises(ValueError, match="'proj' matched no module"):
        resolve(model, "proj")


def test_missing_target_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"'q_prj' matched no module; close module names: q_proj"):
        dt.inject(blocks(), LoRA(), targets=["q_prj"])
    with pytest.raises(ValueError, match="targets must name at least one module"):
        dt.inject(blocks(), LoRA(), targets=[])
    with pytest.raises(ValueError, match="cannot use 3"):
        dt.inject(blocks(), LoRA(), targets=[3])  # type: ignore[list-item]


def test_all_linear_leaves_out_heads() -> None:
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    lm = transformers.GPT2LMHeadModel(cfg)
    paths = resolve(lm, dt.ALL_LINEAR)
    assert "lm_head" not in paths
    assert paths == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    bcfg = transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    clf = transformers.BertForSequenceClassification(bcfg)
    paths = resolve(clf, dt.ALL_LINEAR)
    assert "classifier" not in paths and "bert.encoder.layer.0.attention.self.query" in paths


def test_query_value_names_the_attention_projections_each_model_has() -> None:
    from deltatune.train.prepare import harness_targets

    bcfg = transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    bert = transformers.BertForSequenceClassification(bcfg)
    assert resolve(bert, QUERY_VALUE) == resolve(bert, ["query", "value"])
    gpt2 = GPT2Style()
    assert resolve(gpt2, [QUERY_VALUE]) == ["c_attn"]
    with pytest.raises(ValueError, match="'query-value' matched no module: .*q_proj/v_proj, c_attn or q/v"):
        resolve(nn.Sequential(nn.Linear(4, 4)), QUERY_VALUE)
    # One rule: the method's placement, else the caller's fallback (the harness's: query-value where
    # the model has those projections, else all-linear; the library's: all-linear).
    assert default_targets(LoRA(), bert) == dt.ALL_LINEAR
    assert default_targets(LoRA(), bert, QUERY_VALUE) == QUERY_VALUE
    assert harness_targets(LoRA(), bert) == QUERY_VALUE
    assert harness_targets(LoRA(), nn.Sequential(nn.Linear(4, 4))) == dt.ALL_LINEAR
    bitfit = dt.REGISTRY["bitfit"]()
    assert harness_targets(bitfit, bert) == default_targets(bitfit, bert) != QUERY_VALUE


def test_inject_default_is_all_linear_and_wrappers_are_not_retargeted() -> None:
    model = GPT2Style()
    att = dt.inject(model, LoRA(rank=2))
    assert sorted(att.wrappers) == ["c_attn", "c_fc", "c_out", "c_proj"]
    # A second adapter sees through the wrappers: the same paths, not "c_attn.base".
    att2 = dt.inject(model, LoRA(rank=2), name="two")
    assert att2.info("two").targets == att.info("default").targets


def test_wrapped_module_of_another_attachment_is_refused() -> None:
    outer = nn.Sequential(nn.Sequential(nn.Linear(4, 4)))
    dt.inject(outer, LoRA(rank=1), targets=["0.0"])
    with pytest.raises(ValueError, match="already wrapped by another deltatune attachment"):
        dt.inject(outer[0], LoRA(rank=1), targets=["0"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="registered deltatune method"):
        dt.inject(blocks(), object(), targets=["q_proj"])
    with pytest.raises(ValueError, match="adapter name"):
        dt.inject(blocks(), LoRA(), targets=["q_proj"], name="a.b")
    with pytest.raises(ValueError, match="seed must be an integer"):
        dt.inject(blocks(), LoRA(), targets=["q_proj"], seed="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no deltatune adapters"):
        dt.unload(blocks())
    with pytest.raises(ValueError, match="has no deltatune adapters"), dt.disabled(blocks()):
        pass


# -- modules_to_save ---------------------------------------------------------------------------


def test_modules_to_save_trains_a_copy_and_disabled_uses_the_original() -> None:
    model = TOYS[0].build()
    original_head = model.head
    dt.inject(model, LoRA(rank=2), targets=["fc1"], modules_to_save=["head"])
    trainable = dt.trainable_parameters(model)
    head_copy = attachment_of(model).layers("default")["head"]
    assert {id(p) for p in head_copy.parameters()} <= {id(p) for p in trainable}
    assert not any(p.requires_grad for p in original_head.parameters())
    x = torch.randn(3, 16)
    with torch.no_grad():
        head_copy.module.bias.add_(1.0)
    with dt.disabled(model):
        base = model(x)
    assert torch.allclose(model(x) - base, torch.ones_like(base), atol=1e-5)
    merged = dt.merge(model)
    assert torch.allclose(merged(x) - base, torch.ones_like(base), atol=1e-5)
    assert merged.head is not original_head


def test_modules_to_save_cannot_overlap_targets() -> None:
    with pytest.raises(ValueError, match="overlaps the targeted"):
        dt.inject(TOYS[0].build(), LoRA(), targets=["head"], modules_to_save=["head"])


# -- merge / route errors ----------------------------------------------------------------------


def test_merge_refuses_non_mergeable(monkeypatch: pytest.MonkeyPatch) -> None:
    model = blocks()
    dt.inject(model, LoRA(), targets=["q_proj"])
    monkeypatch.setattr(LoRA, "mergeable", False)
    with pytest.raises(ValueError, match=r"LoRA \(adapter 'default'\) is not mergeable"):
        dt.merge(model)
    assert dt.has_adapters(model)


def test_merge_selected_adapter_drops_the_others() -> None:
    model = TOYS[0].build()
    dt.inject(model, LoRA(), targets=["fc1"], name="a")
    dt.inject(model, LoRA(), targets=["fc2"], name="b")
    with torch.no_grad():
        for p in attachment_of(model).adapters["a"].trainable:
            p.add_(0.1)
    dt.set_active(model, "a")
    x = torch.randn(2, 16)
    expected = model(x)
    dt.merge(model, "a")
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert isinstance(model.fc2, nn.Linear)


# -- files -------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = TOYS[0].build()
    dt.inject(model, LoRA(rank=2), targets=["fc1", "fc2"])
    dt.save(model, tmp_path / "a")
    return tmp_path / "a"


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _rewrite_tensors(folder: Path, edit: object) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "adapter.safetensors"))
    edit(tensors)  # type: ignore[operator]
    save_file(tensors, str(folder / "adapter.safetensors"))


def test_load_reports_missing_extra_and_misshaped(saved: Path) -> None:
    _rewrite_tensors(saved, lambda t: t.pop("fc1.lora_A"))
    with pytest.raises(ValueError, match=r"missing tensors \[fc1.lora_A\]"):
        dt.load(TOYS[0].build(), saved)
    _rewrite_tensors(saved, lambda t: t.update({"fc1.lora_A": torch.zeros(2, 16), "fc9.x": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \[fc9.x\]"):
        dt.load(TOYS[0].build(), saved)
    _rewrite_tensors(saved, lambda t: (t.pop("fc9.x"), t.update({"fc1.lora_A": torch.zeros(3, 16)})))
    model = TOYS[0].build()
    with pytest.raises(ValueError, match=r"fc1.lora_A: file \(3, 16\) vs model \(2, 16\)"):
        dt.load(model, saved)
    assert not dt.has_adapters(model)  # nothing half-loaded


def test_load_refuses_corrupted_files(saved: Path) -> None:
    data = (saved / "adapter.safetensors").read_bytes()
    (saved / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dt.load(TOYS[0].build(), saved)
    (saved / "adapter.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dt.load(TOYS[0].build(), saved)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dt.load(TOYS[0].build(), saved)


def test_load_refuses_bad_configs(saved: Path) -> None:
    _edit_config(saved, format_version=99)
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        dt.load(TOYS[0].build(), saved)
    _edit_config(saved, format_version=1, method="nope")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        dt.load(TOYS[0].build(), saved)
    _edit_config(saved, method="lora", config={"rank": 2, "rnak": 3})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rnak'\]"):
        dt.load(TOYS[0].build(), saved)
    _edit_config(saved, config={"rank": -2})
    with pytest.raises(ValueError, match="LoRA.rank must be an integer >= 1, got -2"):
        dt.load(TOYS[0].build(), saved)
    _edit_config(saved, config={"rank": 2}, extra_key=1)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra_key'\]"):
        dt.load(TOYS[0].build(), saved)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        dt.load(TOYS[0].build(), saved / "nowhere")


def test_load_onto_another_base_model_is_an_error(saved: Path) -> None:
    other = TOYS[0].build()
    other.fc1 = nn.Linear(16, 40)
    with pytest.raises(
        ValueError,
        match=r"different base model: \[fc1: adapter has Linear\(32, 16\), model has Linear\(40, 16\)",
    ):
        dt.load(other, saved)
    with pytest.raises(ValueError, match="different base model"):
        dt.load(blocks(), saved)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = TOYS[0].build()
    dt.inject(model, LoRA(rank=2), targets=["fc1"])
    dt.save(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(1.0)

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("deltatune.formats.files.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        dt.save(model, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp folder left behind


def test_peft_folder_is_pointed_to_import_peft(saved: Path) -> None:
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(ValueError, match="import_peft"):
        dt.load(TOYS[0].build(), saved)


def test_load_under_another_name_next_to_an_existing_adapter(saved: Path) -> None:
    model = TOYS[0].build()
    dt.inject(model, LoRA(rank=4), targets=["fc1"])
    dt.load(model, saved, name="loaded")
    assert attachment_of(model).active == ("loaded",)
    assert sorted(attachment_of(model).adapters) == ["default", "loaded"]


def test_wrapper_exposes_base_attributes() -> None:
    model = TOYS[0].build()
    dt.inject(model, LoRA(rank=2), targets=["fc1"])
    assert model.fc1.weight is model.fc1.base.weight
    assert model.fc1.in_features == 16 and model.fc1.out_features == 32
    with pytest.raises(AttributeError):
        _ = model.fc1.no_such_attribute


def test_deepcopy_of_an_adapted_model_is_independent() -> None:
    import copy

    model = TOYS[0].build()
    dt.inject(model, LoRA(rank=2), targets=["fc1"])
    twin = copy.deepcopy(model)
    x = torch.randn(2, 16)
    assert torch.equal(twin(x), model(x))
    with torch.no_grad():
        for p in dt.trainable_parameters(twin):
            p.add_(0.5)
    assert not torch.equal(twin(x), model(x))
    assert twin.fc1._switch is not model.fc1._switch  # the copy has its own switch
    with dt.disabled(twin):
        base = twin(x)
        assert attachment_of(model).switch.enabled
    dt.unload(model)
    assert torch.equal(model(x), base)
    assert dt.has_adapters(twin) and len(dt.trainable_parameters(twin)) == 2
