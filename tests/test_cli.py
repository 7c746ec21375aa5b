"""The ``deltatune`` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
