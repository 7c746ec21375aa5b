"""The ``deltatune`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import deltatune as dt
from deltatune import REGISTRY
from deltatune.cli import main


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
    assert set(by_name) == set(REGISTRY)
    lora = by_name["lora"]
    assert lora["capabilities"]["mergeable"] is True
    assert lora["capabilities"]["layer_types"] == ["linear", "conv1d", "embedding"]
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
    att = dt.inject(model, cls(**cls.small_example), targets=["a", "c"], modules_to_save=["head"])
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
    from deltatune.cli import _train_parser

    parser = _train_parser("lora")
    assert parser.parse_args(["--init", "pissa"]).field__init == dt.PiSSA()
    spec = '{"type": "pissa", "svd": "randomized", "niter": 2}'
    assert parser.parse_args(["--init", spec]).field__init == dt.PiSSA(svd="randomized", niter=2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--init", "no_such_init"])
    assert "unknown component type 'no_such_init'" in capsys.readouterr().err
