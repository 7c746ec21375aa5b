"""``deltatune export`` (deltatune.cli.export) on a tiny random chat Llama: each target is read back
by the runtime that serves it (PEFT, transformers; llama.cpp's GGUF through transformers' reader and
the adapter arithmetic, tests/test_export_gguf.py) and gives the adapted model's outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import deltatune as dt
from deltatune.cli.main import main
from deltatune.formats.gguf import export_gguf_model
from deltatune.train.models import load_model
from deltatune.train.provenance import save
from tiny_chat import save_tiny_chat_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

IDS = torch.tensor([[5, 40, 41, 42, 3, 60, 61]])


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


class Setup:
    def __init__(self, root: Path) -> None:
        self.folder = save_tiny_chat_llama(root / "model")
        self.lora = self.adapter(root / "lora", dt.LoRA(rank=4, alpha=8))
        self.expected = self.adapted(self.lora)
        base, _ = load_model(self.folder, "generation")
        self.template = export_gguf_model(base, root / "base-template.gguf", dtype="f32")

    def adapter(self, out: Path, method: Any) -> str:
        model, _ = load_model(self.folder, "generation")
        dt.inject(model, method, targets=["all-linear"], seed=1)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in dt.trainable_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        save(model, out, base_model=self.folder)  # (the head read off the model: a causal LM)
        return str(out)

    def adapted(self, adapter: str) -> torch.Tensor:
        model, _ = load_model(self.folder, "generation")
        dt.load(model, adapter)
        return logits(model.eval())

    def base(self) -> Any:
        return transformers.AutoModelForCausalLM.from_pretrained(self.folder).eval()


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("export"))


def export(*argv: str) -> int:
    return main(["export", *argv])


def test_peft_lora_loads_in_peft_with_our_outputs(s: Setup, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "peft"
    assert export(s.lora, "--to", "peft-lora", "--out", str(out)) == 0
    assert "rank 4 on 14 modules" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == s.folder
    loaded = peft.PeftModel.from_pretrained(s.base(), out).eval()
    assert (logits(loaded) - s.expected).abs().max() <= 1e-5


def test_the_vllm_profile_writes_one_rank_and_one_scale(s: Setup, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "vllm"
    assert export(s.lora, "--to", "peft-lora", "--for", "vllm", "--max-rank", "2", "--out", str(out)) == 2
    assert "rank 4 (at " in capsys.readouterr().err and not out.exists()
    assert export(s.lora, "--to", "peft-lora", "--for", "vllm", "--max-rank", "16", "--out", str(out)) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    assert config["modules_to_save"] is None and config["bias"] == "none" and not config["use_dora"]
    loaded = peft.PeftModel.from_pretrained(s.base(), out).eval()
    assert (logits(loaded) - s.expected).abs().max() <= 1e-5


def test_merged_loads_in_transformers_and_out_is_never_overwritten_silently(
    s: Setup, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "merged"
    assert export(s.lora, "--to", "merged", "--out", str(out)) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(model) - s.expected).abs().max() <= 5e-5  # (W + ΔW rounded once to float32)
    assert (out / "tokenizer.json").is_file()
    for command in (["export", s.lora, "--to", "merged"], ["merge", s.lora]):
        assert main([*command, "--out", str(out)]) == 2
        assert "already exists; pass --overwrite" in capsys.readouterr().err
    (out / "stale.txt").write_text("from before")
    assert main(["merge", s.lora, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists()  # replaced whole, not mixed


def test_gguf_writes_the_lora_and_the_base_and_gguf_merged_reads_back(
    s: Setup, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "gguf"
    assert export(s.lora, "--to", "gguf", "--out", str(out), "--gguf-base", str(s.template)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter.gguf", "base-f16.gguf"]
    assert "llama-cli -m" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out / "adapter.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert len(reader.tensors) == 2 * 14
    merged = tmp_path / "merged-gguf"
    argv = ["--to", "gguf-merged", "--out", str(merged), "--gguf-type", "f32"]
    assert export(s.lora, *argv) == 2
    assert "needs --gguf-base" in capsys.readouterr().err and not merged.exists()
    assert export(s.lora, *argv, "--gguf-base", str(s.template)) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(merged), gguf_file="model-f32.gguf").eval()
    assert (logits(model) - s.expected).abs().max() <= 1e-4
    bare = tmp_path / "bare"
    assert export(s.lora, "--to", "gguf", "--out", str(bare)) == 0
    assert [p.name for p in bare.iterdir()] == ["adapter.gguf"]
    assert "no base GGUF written" in capsys.readouterr().out


def test_a_dora_adapter_is_refused_or_approximated(s: Setup, tmp_path: Path, capsys: Any) -> None:
    dora = s.adapter(tmp_path / "dora", dt.DoRA(rank=2))
    assert export(dora, "--to", "peft-lora", "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "not a low-rank update" in err and "--to merged" in err and "--approximate-rank" in err
    assert export(dora, "--to", "peft-lora", "--approximate-rank", "2", "--out", str(tmp_path / "y")) == 0
    said = capsys.readouterr().out
    assert "relative error" in said and "an approximation" in said


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--to", "merged", "--for", "vllm"], "--for applies to --to peft-lora"),
        (["--to", "merged", "--approximate-rank", "2"], "--approximate-rank applies"),
        (["--to", "peft-lora", "--gguf-type", "q8_0"], "--gguf-base and --gguf-type apply"),
        (["--to", "gguf", "--gguf-base", "nowhere.gguf"], "no such file"),
    ],
)
def test_flags_of_another_target_are_refused(
    s: Setup, tmp_path: Path, capsys: Any, argv: list[str], message: str
) -> None:
    assert export(s.lora, *argv, "--out", str(tmp_path / "o")) == 2
    assert message in capsys.readouterr().err


def test_a_missing_adapter_or_another_base_is_refused_and_nothing_is_written(
    s: Setup, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "o"
    assert export(str(tmp_path / "nowhere"), "--to", "peft-lora", "--out", str(out)) == 2
    assert "nowhere" in capsys.readouterr().err and not out.exists()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text((Path(s.lora) / "adapter_config.json").read_text())
    assert export(str(partial), "--to", "peft-lora", "--out", str(out)) == 2
    assert "adapter.safetensors" in capsys.readouterr().err and not out.exists()
    other = save_tiny_chat_llama(tmp_path / "other", seed=1)  # same shapes, other weights
    assert export(s.lora, "--model", other, "--to", "peft-lora", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "--no-strict-base" in err and not out.exists()


def test_combine_writes_an_adapter_that_load_export_and_chat_read(
    s: Setup, tmp_path: Path, capsys: Any
) -> None:
    other = s.adapter(tmp_path / "other", dt.VeRA(rank=8))
    out = tmp_path / "ties"
    argv = [s.lora, other, "--weights", "0.7", "0.5", "--how", "ties", "--density", "0.5", "--rank", "full"]
    assert main(["combine", *argv, "--out", str(out)]) == 0
    assert "ties combination" in capsys.readouterr().out
    # The same combination in Python, on adapters loaded by hand, gives the same outputs.
    model, _ = load_model(s.folder, "generation")
    dt.load(model, s.lora, name="x", activate=False)
    dt.load(model, other, name="y", activate=False)
    dt.combine(model, {"x": 0.7, "y": 0.5}, "c", how="ties", density=0.5, rank="full")
    dt.set_active(model, "c")
    expected = logits(model.eval())
    again, _ = load_model(s.folder, "generation")
    dt.load(again, out)
    assert (logits(again.eval()) - expected).abs().max() <= 1e-5
    assert export(str(out), "--to", "peft-lora", "--out", str(tmp_path / "peft")) == 0
    loaded = peft.PeftModel.from_pretrained(s.base(), tmp_path / "peft").eval()
    assert (logits(loaded) - expected).abs().max() <= 1e-5
    assert main(["combine", s.lora, other, "--weights", "1", "--out", str(tmp_path / "w")]) == 2
    assert "2 adapters" in capsys.readouterr().err
    assert (
        main(["combine", s.lora, other, "--how", "ties", "--density", "2", "--out", str(tmp_path / "d")]) == 2
    )
    assert "must be in (0, 1]" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_combine_refuses_an_adapter_of_another_base(s: Setup, tmp_path: Path, capsys: Any) -> None:
    other_base = save_tiny_chat_llama(tmp_path / "other-base", seed=1)
    model, _ = load_model(other_base, "generation")
    dt.inject(model, dt.LoRA(rank=4), targets=["all-linear"], seed=1)
    save(model, tmp_path / "foreign", base_model=other_base)
    out = tmp_path / "c"
    assert main(["combine", s.lora, str(tmp_path / "foreign"), "--out", str(out)]) == 2
    assert "--no-strict-base" in capsys.readouterr().err and not out.exists()
