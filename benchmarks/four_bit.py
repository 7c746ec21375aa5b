"""Memory of a 4-bit base (issue 26): SmolLM2-135M-Instruct, LoRA on every linear layer, float32 base
against NF4 (QLoRA) and NF4 with PiSSA's residual (QPiSSA, 5 rounds), on GSM8K as chat.

Each configuration is one ``deltatune train`` process (``--steps`` steps of 4 conversations of at
most 256 tokens, then the held-out loss on 20 held-out conversations), so that its peak resident
memory (``os.wait4``) is its own. Reported per run: the bytes of the model's weights in memory
(``metrics.json``'s ``weight_bytes``: a 4-bit weight at what NF4 stores, scales included), the bytes
a bfloat16 copy of the base would take (computed: 2 bytes a parameter), peak resident memory, the
anonymous part of it, train seconds and the held-out loss (one seed: a sanity check, not an accuracy
claim). On a CPU the peak includes the float32 model as it loads, before it is quantised.

    .venv/bin/python benchmarks/four_bit.py --json benchmarks/results/four-bit/smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # type: ignore[import-not-found]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from data_memory import measured
from gsm8k_chat import write_chat_files  # type: ignore[import-not-found]

CONFIGS: dict[str, list[str]] = {
    "float32 base (LoRA)": [],
    "nf4 base (QLoRA)": ["--quantize", "nf4"],
    "nf4 residual (QPiSSA, 5 rounds)": ["--quantize", "nf4", "--init", "pissa", "--quantize-iterations", "5"],
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="deltatune-four-bit-"))
    train_file, held_file = write_chat_files(Path(args.data_dir), root / "data", 400, 20)
    result: dict[str, Any] = {"config": vars(args), "runs": {}}
    for name, extra in CONFIGS.items():
        out = root / name.split()[0].replace("float32", "float")
        cmd = [
            sys.executable,
            "-m",
            "deltatune.cli",
            "train",
            "--model",
            "smollm2",
            "--data",
            str(train_file),
        ]
        cmd += ["--eval-data", str(held_file), "--method", "lora", "--rank", "16", "--alpha", "32"]
        cmd += ["--targets", "all-linear", "--steps", str(args.steps), "--batch-size", "4"]
        cmd += ["--max-length", "256", "--eval-batch-size", "4", "--checkpoint-every", "0", "--no-progress"]
        cmd += ["--out", str(out / "run"), "--overwrite", *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DELTATUNE_CACHE": str(root / "cache")}
        run = measured(cmd, env, name)
        record = json.loads((out / "run" / "metrics.json").read_text())
        run.update(
            weight_mb=round(record["weight_bytes"] / 2**20, 1),
            bf16_weight_mb=round(2 * record["total_parameters"] / 2**20, 1),
            train_seconds=record["train_seconds"],
            held_out_loss=round(record["metrics"]["loss"], 4),
            trainable=record["trainable_parameters"],
        )
        result["runs"][name] = run
        print(f"{name}: {run}", flush=True)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
