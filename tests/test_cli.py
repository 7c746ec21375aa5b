"""The ``deltatune`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import deltatune as dt
from deltatune import REGISTRY
from deltatune.cli.main import main


def test_methods_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in REGISTRY:
        assert name in out
    assert "rank" in out and "an integer >= 1" in out and "mergeable" in out


def test_methods_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(REGISTRY) | {"full", "head"}
    lora = by_name["lora"]
    assert lora["capabilities"]["mergeable"] is True
    assert lora["capabilities"]["layer_types"] == ["linear", "conv1d", "embedding", "experts"]
    fields = {f["name"]: f for f in lora["fields"]}
    assert fields["rank"]["default"] == 8
    assert fields["init"]["default"] == {"type": "kaiming_uniform"}


def test_console_entry_point_runs() -> None:
    exe = subprocess.run(
        [sys.executable, "-m", "deltatune.cli", "methods", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(exe.stdout)[0]["name"]


def test_unknown_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_info_counts_match_the_model_without_loading_it(
    method: str, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathlib import Path

    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    import deltatune as dt

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(32, 64)
            self.c = Conv1D(16, 64)  # weight (64, 16): GPT-2 layout
            self.head = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.c(self.a(x)))

    cls = REGISTRY[method]
    if not {"linear", "conv1d"} <= set(cls.layer_types):
        pytest.skip(f"{cls.__name__} adapts {cls.layer_types}, not this Net's Linear and Conv1D modules")
    model = Net()
    att = dt.inject(model, cls(**cls.suite.example), targets=["a", "c"], modules_to_save=["head"])
    folder = Path(str(tmp_path))
    dt.save(model, folder)
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    trainable, stored_bytes = att.closed_form("default")
    assert info["trainable_parameters"] == trainable == sum(p.numel() for p in dt.trainable_parameters(model))
    assert info["stored_bytes"] == stored_bytes
    assert info["float32_equivalent_parameters"] == stored_bytes // 4
    assert main(["info", str(folder)]) == 0
    assert f"trainable parameters: {trainable:,}" in capsys.readouterr().out


def test_initialiser_flags_take_a_name_or_json(capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli.main import _train_parser

    parser = _train_parser("lora")
    assert parser.parse_args(["--init", "pissa"]).field__init == dt.PiSSA()
    spec = '{"type": "pissa", "svd": "randomized", "niter": 2}'
    assert parser.parse_args(["--init", spec]).field__init == dt.PiSSA(svd="randomized", niter=2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--init", "no_such_init"])
    assert "unknown component type 'no_such_init'" in capsys.readouterr().err


def _train_help(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["train", *args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_the_choices_and_plain_metavars(capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.train.models import ALIASES
    from deltatune.train.tasks import TASKS

    text = " ".join(_train_help(capsys, "--method", "lora").split())  # undo argparse's wrapping
    assert "FIELD__" not in text
    for flag in ("--rank RANK", "--alpha ALPHA", "--steps STEPS", "--task TASK", "--model MODEL"):
        assert flag in text, flag
    assert "--save-mode {lora,native}" in text and "--rank-stabilized {true,false}" in text
    assert "one of " + ", ".join(sorted(TASKS)) in text
    assert "one of linear, cosine, constant" in text and "one of fp32, bf16" in text
    assert ", ".join(ALIASES) in text and "local folder" in text and "hub name" in text
    assert "full (every parameter trains) or head" in text
    assert "one of kaiming_uniform, gaussian, pissa, milora, corda" in text


@pytest.mark.parametrize("method", [*sorted(REGISTRY), "full"])
def test_every_train_flag_has_help_and_a_plain_metavar(method: str) -> None:
    import dataclasses

    from deltatune.cli.main import _train_parser
    from deltatune.cli.train_help import TRAIN_HELP
    from deltatune.train.loop import TrainConfig

    assert {f.name for f in dataclasses.fields(TrainConfig)} - {"method_fields"} == set(TRAIN_HELP)
    parser = _train_parser(method)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 25
    for action in flags:
        assert action.help and len(action.help) > 10, action.option_strings
        assert "__" not in str(action.metavar), action.option_strings
    assert "FIELD__" not in parser.format_help()


def test_closed_sets_are_refused_with_their_list(capsys: pytest.CaptureFixture[str]) -> None:
    for flag, bad, listed in (
        ("--task", "bogus", "'sst2'"),
        ("--schedule", "exp", "'cosine'"),
        ("--precision", "fp16", "'bf16'"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["train", flag, bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: invalid choice: '{bad}'" in err and listed in err, err


def test_methods_lists_full_head_and_each_fields_initialisers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "\nfull  (deltatune train only): Full fine-tuning" in out
    assert "\nhead  (deltatune train only): Head only" in out
    assert "initialisers: kaiming_uniform, gaussian, pissa, milora, corda" in out
    assert "initialisers: random_uniform, sampled_vocab, from_text" in out
    assert "largest divisor" in out  # VB-LoRA's vector_length as deltatune train chooses it
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["full"]["harness_only"] and rows["head"]["fields"] == []
    lora_init = {f["name"]: f for f in rows["lora"]["fields"]}["init"]
    assert lora_init["choices"] == ["kaiming_uniform", "gaussian", "pissa", "milora", "corda"]
    prompt_init = {f["name"]: f for f in rows["prompt_tuning"]["fields"]}["init"]
    assert prompt_init["choices"] == ["random_uniform", "sampled_vocab", "from_text"]
    assert "choices" not in {f["name"]: f for f in rows["lora"]["fields"]}["rank"]


def test_a_bad_initialiser_lists_only_the_methods_own(capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli.main import _train_parser

    lora = _train_parser("lora")
    for bad in ("bogus", "sampled_vocab", '{"type": "random_uniform"}'):
        with pytest.raises(SystemExit):
            lora.parse_args(["--init", bad])
        err = capsys.readouterr().err
        assert "kaiming_uniform, gaussian, pissa, milora, corda" in err, err
        assert "sampled_vocab," not in err and "random_uniform," not in err, err
    with pytest.raises(SystemExit):
        lora.parse_args(["--init", "sampled_vocab"])
    assert "'sampled_vocab' is a SampledVocab, not one of LoRAInit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train_parser("prompt_tuning").parse_args(["--init", "pissa"])
    assert "it takes: random_uniform, sampled_vocab, from_text" in capsys.readouterr().err
    # The same from a config file or a Python dict.
    from deltatune.contract import method_from_config

    with pytest.raises(ValueError, match=r"LoRA.init: 'from_text' is a FromText.*it takes: kaiming_uniform"):
        method_from_config("lora", {"init": {"type": "from_text"}})


@pytest.mark.parametrize(
    ("typed", "pointer"),
    [
        ("qlora", "write --method lora --quantize nf4 (QLoRA"),
        ("QPiSSA", "write --method lora --init pissa --quantize nf4 --quantize-iterations 5"),
        ("pissa", "write --method lora --init pissa"),
        ("rslora", "write --method lora --rank-stabilized true"),
        ("loraplus", "write --method lora --loraplus-ratio 16"),
        ("LoRA+", "write --method lora --loraplus-ratio 16"),
        ("prefix", "write --method prefix_tuning"),
        ("ia3", "deltatune has no ia3 (the methods are adalora, adapter"),
        ("lorra", "no such method (did you mean lora or "),
        ("vblroa", "no such method (did you mean vblora or "),
        ("banana", "no such method (deltatune methods lists them); one of adalora"),
    ],
)
def test_method_names_from_papers_point_at_the_flags(
    typed: str, pointer: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("train", "estimate"):
        assert main([command, "--method", typed, "--steps" if command == "train" else "--seq", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"deltatune {command}: error: --method {typed}: {pointer}"), err
        assert err.count("\n") == 1  # one line, no traceback


def test_method_names_ignore_case_and_dashes(capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli.hints import canonical_method

    known = ["lora", "lora_fa", "full"]
    assert [canonical_method(n, known) for n in ("LoRA", "lora-fa", "LORA_FA", "Full")] == [
        "lora",
        "lora_fa",
        "lora_fa",
        "full",
    ]
    text = _train_help(capsys, "--method", "LoRA-FA")
    assert "lora_fa fields (LoRAFA" in text
    with pytest.raises(ValueError, match=r"--method qlora: write --method lora --quantize nf4"):
        canonical_method("qlora", known)


def test_config_file_method_names_are_pointed_too(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathlib import Path

    run = Path(str(tmp_path)) / "run.yaml"
    run.write_text("method: rslora\nsteps: 1\n")
    assert main(["train", "--config", str(run)]) == 2
    assert "--method rslora: write --method lora --rank-stabilized true" in capsys.readouterr().err


def test_adapter_commands_explain_every_flag() -> None:
    from deltatune.cli.main import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, (name, action.dest)
    limit = next(a for a in subs.choices["eval"]._actions if a.dest == "limit")
    assert "seeded sample" in str(limit.help)


def test_estimate_says_what_the_floor_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "frozen-base floor: the base model with every weight frozen" in text
