"""The gap between ``deltatune estimate`` and a real CPU step's peak resident memory (issue 32).

One process per row (peak RSS is per process): SmolLM2-135M's shape (random weights), float32, 2 x 1024
tokens, sdpa attention, the frozen-base floor and LoRA r=16 on every projection; prints and writes
``benchmarks/results/cost/rss_gap.json``. RSS also holds the Python process, torch and the model, so
the step's own figure is the rise of peak RSS over the step.

    .venv/bin/python benchmarks/estimate_gap.py      # 2 minutes on 2 cores, 6 GiB
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
import transformers

import deltatune as dt
from deltatune.runtime.estimate import estimate, model_config

OUT = Path(__file__).resolve().parent / "results" / "cost" / "rss_gap.json"


def row(method: str) -> None:
    transformers.logging.set_verbosity_error()
    cfg = model_config("smollm2-135m")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    lora = dt.LoRA(rank=16, alpha=32)
    m = lora if method == "lora" else "floor"
    est = estimate(model, m, targets="all-linear" if method == "lora" else None, batch=2, seq=1024)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.requires_grad_(False)
    if method == "lora":
        dt.inject(model, lora, targets="all-linear")
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 1024))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    if method == "floor":
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if opt:
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "method": method,
                "estimate_total_gib": round(est.total_bytes / 2**30, 3),
                "estimate_activations_gib": round(est.activation_bytes / 2**30, 3),
                "rss_before_step_gib": round(start / 2**30, 3),
                "peak_rss_gib": round(peak / 2**30, 3),
                "step_rss_gib": round((peak - start) / 2**30, 3),
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        row(sys.argv[1])
    else:
        rows = []
        for name in ("floor", "lora"):
            done = subprocess.run(
                [sys.executable, __file__, name], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1])
        OUT.write_text(json.dumps(rows, indent=1) + "\n")
