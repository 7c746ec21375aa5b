"""Method comparison: several (method, config) rows on the same tasks, seed, data order and budget.

Each row runs as its own ``deltatune train`` process, so its peak memory (RSS on CPU,
``max_memory_allocated`` on GPU) is its own. The script writes ``results.json``, ``results.md``
(one table) and ``scatter.png`` (main metric vs stored bytes) into ``--out``.

    .venv/bin/python benchmarks/compare.py --preset cpu      # ~35 min on 2 CPU cores
    .venv/bin/python benchmarks/compare.py --preset gpu      # bigger budgets, SmolLM2; needs a GPU
    .venv/bin/python benchmarks/compare.py --preset smoke    # 2 minutes, to check the plumbing
    .venv/bin/python benchmarks/compare.py --preset lora-family --seeds 0 1 2 --jobs 2   # ~2 h
    .venv/bin/python benchmarks/compare.py --preset tuned --lr-grid --jobs 2 --seeds 0 1 2
        # each method at its own learning rate: the grid on SST-2's validation split, then three seeds
        # on SST-2 and AG News (benchmarks/lr_grid.py; runs.json keeps every run, so it resumes)
    .venv/bin/python benchmarks/compare.py --preset causal    # SmolLM2 on GSM8K chat data (causal.py)

Times are wall-clock seconds of the training steps on a shared machine whose speed drifts by
±30 % between runs: read them as rough costs, not as ratios (benchmarks/lora_vs_peft.py measures
ratios properly, interleaved in one process).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibration import COVARIANCE  # noqa: E402  (a script beside this one)
from compare_report import markdown, scatter  # noqa: E402
from lr_grid import EXTEND, GRID, centre, choose, further, grid_rows, summary  # noqa: E402
from lr_grid import markdown as grid_markdown  # noqa: E402


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    fields: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # per-row training options, e.g. lr, targets


LORA_QV = Row("LoRA r=8 (query, value)", "lora", {"rank": 8, "alpha": 16}, {"lr": 1e-3})
LORA_ALL = Row(
    "LoRA r=8 (all linear)", "lora", {"rank": 8, "alpha": 16}, {"lr": 1e-3, "targets": ["all-linear"]}
)
FULL = Row("full fine-tuning", "full", {}, {"lr": 5e-5, "head_lr": 1e-3})
HEAD = Row("head only (linear probe)", "head", {}, {"lr": 1e-3})

VB = {"rank": 4, "num_vectors": 64, "vector_length": 64, "topk": 2}
VB_QV = Row("VB-LoRA r=4 h=64 b=64 k=2 (query, value)", "vblora", VB, {"lr": 1e-2})
VB_ALL = Row("VB-LoRA r=4 h=64 b=64 k=2 (all linear)", "vblora", VB, {"lr": 1e-2, "targets": ["all-linear"]})
VB_K1 = Row("VB-LoRA k=1 (query, value)", "vblora", {**VB, "topk": 1}, {"lr": 1e-2})
VB_B32 = Row(
    "VB-LoRA b=32 h=128 (query, value)",
    "vblora",
    {**VB, "vector_length": 32, "num_vectors": 128},
    {"lr": 1e-2},
)

# Addition and specification methods (issue 7); every row trains the task head at 1e-3 as the others do.
ADAPTER_LR = {"lr": 1e-3, "head_lr": 1e-3}
HOULSBY = Row("Houlsby adapter (attention + FFN, m=d/16)", "adapter", {"placement": "houlsby"}, ADAPTER_LR)
PFEIFFER = Row("Pfeiffer adapter (FFN, m=d/16)", "adapter", {"placement": "pfeiffer"}, ADAPTER_LR)
BITFIT = Row("BitFit (all linear biases)", "bitfit", {}, {"lr": 3e-3, "head_lr": 1e-3})
LAST2 = Row("last 2 blocks (partial)", "partial", {"blocks": 2}, {"lr": 5e-5, "head_lr": 1e-3})

# Prompt family (issue 7). Prompt tuning at 3e-2 (Lester et al. use 0.3 with Adafactor on T5; 3e-3 to
# 1e-1 all stayed at chance in 40-step SST-2 probes), P-tuning at 1e-3 (PEFT's examples; 1e-2 was no
# better), prefix tuning's MLP at 1e-3 (Li & Liang: 5e-5 over many epochs; 5e-3 diverged in a probe).
PROMPT_LR = {"lr": 3e-2, "head_lr": 1e-3}
PROMPT = Row("prompt tuning (n=20, sampled vocab)", "prompt_tuning", {"num_virtual_tokens": 20}, PROMPT_LR)
PREFIX = Row("prefix tuning (n=10, MLP h=512)", "prefix_tuning", {}, {"lr": 1e-3, "head_lr": 1e-3})
PTUNING = Row("P-tuning (n=20, LSTM h=128)", "p_tuning", {}, {"lr": 1e-3, "head_lr": 1e-3})
# E2E with SmolLM2, the README's LoRA budget (20 steps of 8, 24 test meaning representations).
E2E_BUDGET = {"steps": 20, "batch_size": 8, "eval_limit": 24, "max_new_tokens": 40}
E2E_LORA = Row("LoRA r=8 (q_proj, v_proj)", "lora", {"rank": 8, "alpha": 16}, {"lr": 2e-3})
E2E_PROMPT = Row(PROMPT.label, PROMPT.method, PROMPT.fields, {"lr": 3e-2})
E2E_PREFIX = Row("prefix tuning (n=10, MLP h=512)", "prefix_tuning", {}, {"lr": 1e-3})


# The LoRA family, part 1 (issue 15): every row on query/value at LoRA's budget and lr (1e-3, head
# 1e-3), alpha = 2r. VeRA at lr 1e-2 for its vectors (Kopiczko et al. tune 4e-3 to 1e-2 for RoBERTa),
# rank 128: 12 x (128 + 384) x 4 = 24,576 adapter bytes, 12x fewer than LoRA r=8.
def lora_rank(method: str, label: str, rank: int, **fields: Any) -> Row:
    return Row(f"{label} r={rank}", method, {"rank": rank, "alpha": 2 * rank, **fields}, {"lr": 1e-3})


LORA_FAMILY = [
    *(lora_rank("lora", "LoRA", r) for r in (2, 4, 8)),
    *(lora_rank("dora", "DoRA", r) for r in (2, 4, 8)),
    Row("VeRA r=128", "vera", {"rank": 128}, {"lr": 1e-2, "head_lr": 1e-3}),
    Row("Tied-LoRA r=8 (ABuv)", "tied_lora", {"rank": 8, "alpha": 16}, {"lr": 1e-3}),
    Row("LoRA-FA r=8", "lora_fa", {"rank": 8, "alpha": 16}, {"lr": 1e-3}),
    Row("LoRA+ r=8 (ratio 16)", "lora", {"rank": 8, "alpha": 16}, {"lr": 1e-3, "loraplus_ratio": 16}),
    lora_rank("lora", "rsLoRA", 8, rank_stabilized=True),
]


# The LoRA family, part 2 (issue 16): rank refinement, co-updating and pruning against LoRA on
# query/value at LoRA's budget. AdaLoRA starts at r=6 and ends at an average r=4 (LoRA r=4's final
# parameter count), budget falling from step 15 to step 120 every 5 steps (the paper's tinit, tfinal
# and ΔT, scaled to 150 steps); Delta-LoRA's W update starts after 15 steps with the paper's λ=2;
# LoRA-drop samples 15 steps (a tenth of the run) and keeps 90 % of the importance.
LORA_FAMILY_2 = [
    lora_rank("lora", "LoRA", 4),
    Row(
        "AdaLoRA r 6 -> 4",
        "adalora",
        {"init_r": 6, "target_r": 4, "alpha": 8, "tinit": 15, "tfinal": 30, "delta_t": 5},
        # At LoRA's 1e-3 AdaLoRA stays at chance in 150 steps (50.92 % on SST-2, seeds 0 and 1): P and
        # Q start at N(0, 0.02²) and Λ at 0 (PEFT's init), so ΔW = P Λ Q grows ~1e-3 as fast as LoRA's.
        # 2e-2 reached 79.82 % (seed 0; benchmarks/README.md, "The LoRA family, part 2").
        {"lr": 2e-2, "head_lr": 1e-3},
    ),
    lora_rank("lora", "LoRA", 8),
    lora_rank("delta_lora", "Delta-LoRA", 8, lam=2.0, warmup_steps=15),
    lora_rank("lora_drop", "LoRA-drop", 8, sample_steps=15, threshold=0.9),
]
# ReLoRA against LoRA at equal steps on SmolLM2 (E2E): restarts every 10 of 40 steps.
RELORA_E2E = [
    Row("LoRA r=8 (q_proj, v_proj)", "lora", {"rank": 8, "alpha": 16}, {"lr": 2e-3}),
    Row(
        "ReLoRA r=8, restart every 10 (q_proj, v_proj)",
        "relora",
        {"rank": 8, "alpha": 16, "restart_every": 10, "rewarmup_steps": 2},
        {"lr": 2e-3},
    ),
]


def intrinsic(d: int, structure: str = "said") -> Row:
    """Intrinsic-dimension row: all linear layers (weights and biases) projected from d values.

    The learning rate is INTRINSIC_LR at d = 1000, scaled by sqrt(1000 / d): Adam moves every
    coordinate of θ_d by about lr per step, so a step moves the weights by about lr·sqrt(d) (P
    preserves norms); the scaling gives every d the same step in weight space, so that d is not
    confounded with the step size.
    """
    lr = round(INTRINSIC_LR * (1000 / d) ** 0.5, 4)
    fields: dict[str, Any] = {"d": d, "structure": structure}
    if structure == "said" and lr > INTRINSIC_LR:
        # SAID's λs (one per module, 37 here, whatever d) keep the rate tuned at d = 1000: at
        # d = 100 with lr 0.95 for them too, they reached |λ| = 15 and the loss stayed at log 2.
        fields["lambda_lr_ratio"] = round(INTRINSIC_LR / lr, 4)
    return Row(
        f"{structure.upper()} d={d} (all linear)",
        "intrinsic",
        fields,
        {"lr": lr, "head_lr": 1e-3, "targets": ["all-linear"]},
    )


# Picked at d = 1000 on 75-step SST-2 runs (benchmarks/results/intrinsic/README.md).
INTRINSIC_LR = 0.3

# Every method of the library at its own learning rate (issue 30): `--preset tuned --lr-grid` picks
# each row's rate on SST-2's validation split (1,000 training examples held out), then runs three
# seeds of every row on SST-2 and AG News at that rate. Rows name no lr: the grid is centred on the
# method's own default. Most informative rows first (results are written after every run).
QV = {"rank": 8, "alpha": 16}
TUNED_ROWS = [
    Row("LoRA r=8", "lora", QV),
    Row("DoRA r=8", "dora", QV),
    Row("VeRA r=128", "vera", {"rank": 128}),
    Row("LoRA-FA r=8", "lora_fa", QV),
    Row("LoRA+ r=8 (ratio 16)", "lora", QV, {"loraplus_ratio": 16}),
    Row("rsLoRA r=8", "lora", {**QV, "rank_stabilized": True}),
    Row("AdaLoRA r 6 -> 4", "adalora", LORA_FAMILY_2[1].fields),
    Row("VB-LoRA r=4 b=64 k=2", "vblora", VB),
    Row("PiSSA r=8", "lora", {**QV, "init": {"type": "pissa"}}),
    Row("full fine-tuning", "full", {}),
    Row("head only (linear probe)", "head", {}),
    Row("Tied-LoRA r=8 (ABuv)", "tied_lora", QV),
    Row("Houlsby adapter (m=d/16)", "adapter", {"placement": "houlsby"}),
    Row("Pfeiffer adapter (m=d/16)", "adapter", {"placement": "pfeiffer"}),
    Row("BitFit (all linear biases)", "bitfit", {}),
    Row("prefix tuning (n=10, MLP h=512)", "prefix_tuning", {}),
    Row("prompt tuning (n=20)", "prompt_tuning", {"num_virtual_tokens": 20}),
    Row("P-tuning (n=20, LSTM h=128)", "p_tuning", {}),
    Row("last 2 blocks (partial)", "partial", {"blocks": 2}),
    Row("SAID d=1000 (all linear)", "intrinsic", {"d": 1000}, {"targets": ["all-linear"]}),
    Row("Delta-LoRA r=8", "delta_lora", {**QV, "lam": 2.0, "warmup_steps": 15}),
    Row("LoRA-drop r=8", "lora_drop", {**QV, "sample_steps": 15, "threshold": 0.9}),
    Row("ReLoRA r=8 (restart every 50)", "relora", {**QV, "restart_every": 50, "rewarmup_steps": 5}),
    Row("MiLoRA r=8", "lora", {**QV, "init": {"type": "milora"}}),
    Row(
        "CorDA r=8 (ipm, SST-2 calibration)",
        "lora",
        {**QV, "init": {"type": "corda", "covariance": COVARIANCE}},
    ),
    Row("QLoRA r=8 (NF4 base)", "lora", QV, {"quantize": "nf4"}),
    Row("QPiSSA r=8 (NF4 base)", "lora", {**QV, "init": {"type": "pissa"}}, {"quantize": "nf4"}),
    Row("LoRA r=8 (all linear)", "lora", QV, {"targets": ["all-linear"]}),
    # For the claims (claims.py): LoRA at AdaLoRA's final budget, and DoRA against it at a lower rank.
    Row("LoRA r=4", "lora", {"rank": 4, "alpha": 8}),
    Row("DoRA r=4", "dora", {"rank": 4, "alpha": 8}),
]
TUNED_BUDGET = {"steps": 150, "batch_size": 32, "max_length": 64, "validation": 1000}

# The causal-LM suite (issue 30): SmolLM2-135M-Instruct on GSM8K as chat data (benchmarks/causal.py),
# each method at its own default rate, on the attention query/value projections unless the method
# places itself. Budget: 20 steps of 4 conversations (<= 256 tokens), the held-out loss on 32 test
# problems, greedy answers (<= 160 new tokens) to 8 of them, forgetting on 32 AG News articles. Sized
# on an idle 2-core machine (2026-12-07): rsLoRA at 16 steps took 3.6 min in all (6.0 s a step, 77 s of
# evaluation, 40 s of loading and forgetting), so 20 steps of the 11 rows take about 45 min a seed.
CAUSAL_BUDGET = {
    "steps": 20,
    "batch_size": 4,
    "max_length": 256,
    "eval_generate": 8,
    "max_new_tokens": 160,
    "eval_batch_size": 16,
}
CAUSAL_ROWS = [
    Row("LoRA r=8", "lora", QV, {"eval_before": True}),  # also the base's own numbers, once per seed
    Row("rsLoRA r=8", "lora", {**QV, "rank_stabilized": True}),
    Row("DoRA r=8", "dora", QV),
    Row("PiSSA r=8", "lora", {**QV, "init": {"type": "pissa"}}),
    Row("VeRA r=128", "vera", {"rank": 128}),
    Row("VB-LoRA r=4 b=64 k=2", "vblora", VB),
    Row(
        "AdaLoRA r 6 -> 4",
        "adalora",
        {"init_r": 6, "target_r": 4, "alpha": 8, "tinit": 3, "tfinal": 6, "delta_t": 2},
    ),
    Row("prompt tuning (n=20)", "prompt_tuning", {"num_virtual_tokens": 20}),
    Row("prefix tuning (n=10, MLP h=512)", "prefix_tuning", {}),
    Row("Houlsby adapter (m=d/16)", "adapter", {"placement": "houlsby"}),
    Row("BitFit (all linear biases)", "bitfit", {}),
]

PRESETS: dict[str, dict[str, Any]] = {
    "tuned": {
        "model": "minilm",
        "tasks": {"sst2": TUNED_BUDGET, "agnews": {**TUNED_BUDGET, "eval_limit": 2000}},
        "grid_task": "sst2",
        "prepare": "calibration",  # benchmarks/calibration.py: CorDA's covariances
        "rows": TUNED_ROWS,
        "after": "claims",  # benchmarks/claims.py: the papers' claims against results.json
    },
    "prompts": {
        "model": "minilm",
        "tasks": {
            "sst2": {"steps": 150, "batch_size": 32, "max_length": 64},
            "mrpc": {"steps": 150, "batch_size": 16, "max_length": 128},
        },
        "rows": [PROMPT, PREFIX, PTUNING],
        "extra": [
            {"model": "smollm2", "tasks": {"e2e": E2E_BUDGET}, "rows": [E2E_PROMPT, E2E_PREFIX, E2E_LORA]}
        ],
    },
    "intrinsic": {
        "model": "minilm",
        "tasks": {"sst2": {"steps": 150, "batch_size": 32, "max_length": 64}},
        # Most informative first: results.json is rewritten after every row.
        "rows": [intrinsic(d) for d in (1000, 10000, 100, 300)] + [intrinsic(1000, "did")],
        "extra": [
            {
                "model": "minilm",
                "tasks": {"mrpc": {"steps": 150, "batch_size": 16, "max_length": 128}},
                "rows": [intrinsic(1000)],
            },
            {
                "model": "minilm",
                "tasks": {"sst2": {"steps": 150, "batch_size": 32, "max_length": 64}},
                "rows": [intrinsic(3000)],
            },
        ],
        "after": "intrinsic_d90",  # benchmarks/intrinsic_d90.py: d90.png / d90.md from results.json
    },
    "adapters": {
        "model": "minilm",
        "tasks": {
            "sst2": {"steps": 150, "batch_size": 32, "max_length": 64},
            "mrpc": {"steps": 150, "batch_size": 16, "max_length": 128},
        },
        "rows": [HOULSBY, PFEIFFER, BITFIT, LAST2],
    },
    # The same rows at higher learning rates (150 steps is short for a zero-initialised adapter).
    "adapters-lr": {
        "model": "minilm",
        "tasks": {
            "sst2": {"steps": 150, "batch_size": 32, "max_length": 64},
            "mrpc": {"steps": 150, "batch_size": 16, "max_length": 128},
        },
        "rows": [
            Row(f"{HOULSBY.label}, lr 3e-3", "adapter", HOULSBY.fields, {**ADAPTER_LR, "lr": 3e-3}),
            Row(f"{PFEIFFER.label}, lr 3e-3", "adapter", PFEIFFER.fields, {**ADAPTER_LR, "lr": 3e-3}),
            Row(f"{BITFIT.label}, lr 1e-2", "bitfit", BITFIT.fields, {**BITFIT.options, "lr": 1e-2}),
        ],
    },
    "vblora": {
        "model": "minilm",
        "tasks": {"sst2": {"steps": 150, "batch_size": 32, "max_length": 64}},
        "rows": [VB_QV, VB_ALL, VB_K1, VB_B32],
        "extra": [
            {
                "model": "minilm",
                "tasks": {"mrpc": {"steps": 150, "batch_size": 16, "max_length": 128}},
                "rows": [VB_QV, VB_ALL],
            }
        ],
    },
    # Three seeds (--seeds 0 1 2 --jobs 2): DoRA against LoRA at r = 2, 4, 8; VeRA and Tied-LoRA with
    # fewer stored bytes; LoRA-FA's memory; LoRA+ in steps to LoRA's final loss (lora_family.py).
    "lora-family": {
        "model": "minilm",
        "tasks": {
            "sst2": {"steps": 150, "batch_size": 32, "max_length": 64},
            "mrpc": {"steps": 150, "batch_size": 16, "max_length": 128},
        },
        "rows": LORA_FAMILY,
        "after": "lora_family",
    },
    "lora-family-2": {
        "model": "minilm",
        "tasks": {
            "sst2": {"steps": 150, "batch_size": 32, "max_length": 64},
            "mrpc": {"steps": 150, "batch_size": 16, "max_length": 128},
        },
        "rows": LORA_FAMILY_2,
        "extra": [
            {
                "model": "smollm2",
                "tasks": {"e2e": {**E2E_BUDGET, "steps": 40}},
                "rows": RELORA_E2E,
            }
        ],
    },
    "cpu": {
        "model": "minilm",
        "tasks": {
            "sst2": {"steps": 150, "batch_size": 32, "max_length": 64},
            "mrpc": {"steps": 150, "batch_size": 16, "max_length": 128},
        },
        "rows": [FULL, HEAD, LORA_QV, LORA_ALL],
    },
    "causal": {
        "model": "smollm2",
        "tasks": {"gsm8k": CAUSAL_BUDGET},
        "prepare": "causal",  # benchmarks/causal.py: prepare(out) writes the chat data, measure() forgetting
        "rows": CAUSAL_ROWS,
    },
    "causal-smoke": {
        "model": "smollm2",
        "tasks": {
            "gsm8k": {
                **CAUSAL_BUDGET,
                "steps": 2,
                "train_limit": 16,
                "eval_limit": 4,
                "eval_generate": 2,
                "max_new_tokens": 8,
                "max_length": 128,
            },
        },
        "prepare": "causal",
        "rows": [CAUSAL_ROWS[0], CAUSAL_ROWS[7]],
    },
    # The plumbing of --lr-grid in a minute: --preset tuned-smoke --lr-grid --seeds 0 1.
    "tuned-smoke": {
        "model": "minilm",
        "tasks": {
            "sst2": {
                "steps": 4,
                "batch_size": 8,
                "max_length": 32,
                "train_limit": 64,
                "validation": 32,
                "eval_limit": 64,
            },
        },
        "grid_task": "sst2",
        "rows": [TUNED_ROWS[0], Row("head only (linear probe)", "head", {})],
    },
    "smoke": {
        "model": "minilm",
        "tasks": {
            "sst2": {"steps": 4, "batch_size": 8, "max_length": 32, "train_limit": 64, "eval_limit": 64}
        },
        "rows": [FULL, LORA_QV],
    },
    "gpu": {
        "model": "minilm",
        "tasks": {
            "sst2": {"steps": 2000, "batch_size": 32, "max_length": 64},
            "mrpc": {"steps": 1000, "batch_size": 32, "max_length": 128},
            "cola": {"steps": 1000, "batch_size": 32, "max_length": 64},
        },
        "rows": [FULL, HEAD, LORA_QV, LORA_ALL],
        "extra": [
            {
                "model": "smollm2",
                "tasks": {"gsm8k": {"steps": 500, "batch_size": 16, "max_length": 384, "eval_limit": 250}},
                "rows": [
                    Row(
                        "LoRA r=16 (all linear)",
                        "lora",
                        {"rank": 16, "alpha": 32},
                        {"lr": 2e-4, "targets": ["all-linear"]},
                    ),
                    Row("full fine-tuning", "full", {}, {"lr": 1e-5}),
                ],
            }
        ],
    },
}


def run_config(
    model: str, task: str, budget: dict[str, Any], row: Row, out: Path, seed: int, seed_in_name: bool
) -> tuple[Path, dict[str, Any]]:
    """The run folder and the ``deltatune train`` config of one row, task and seed."""
    slug = re.sub(r"[^a-z0-9]+", "_", row.label.lower()).strip("_")
    run_dir = out / "runs" / (f"{model}-{task}-{slug}" + (f"-seed{seed}" if seed_in_name else ""))
    config = {
        "model": model,
        "task": task,
        "method": row.method,
        "method_fields": row.fields,
        "seed": seed,
        "out": str(run_dir),
        "checkpoint_every": 0,
        "resume": False,
        **budget,
        **row.options,
    }
    return run_dir, config


class Records:
    """Every finished run's result by its config (the run folder aside), kept in ``OUT/runs.json``:
    the run folders are not committed (weights), this file is, so ``--reuse`` takes a run made in an
    earlier session, and a grid run is the seed-0 run at the chosen rate."""

    def __init__(self, out: Path) -> None:
        self.path = out / "runs.json"
        self.by_key: dict[str, dict[str, Any]] = (
            json.loads(self.path.read_text()) if self.path.exists() else {}
        )
        self.lock = threading.Lock()

    @staticmethod
    def key(config: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in config.items() if k != "out"}, sort_keys=True)

    def get(self, config: dict[str, Any]) -> dict[str, Any] | None:
        return self.by_key.get(self.key(config))

    def put(self, config: dict[str, Any], result: dict[str, Any]) -> None:
        with self.lock:  # (whole or not at all: a reader never sees a half-written file)
            self.by_key[self.key(config)] = result
            part = self.path.with_suffix(".json.part")
            part.write_text(json.dumps(self.by_key, indent=1))
            os.replace(part, self.path)


def finished(
    model: str,
    task: str,
    budget: dict[str, Any],
    row: Row,
    out: Path,
    seed: int,
    seed_in_name: bool,
    records: Records | None = None,
) -> bool:
    """Whether the run folder holds a finished run of exactly this config, or ``runs.json`` its result."""
    run_dir, config = run_config(model, task, budget, row, out, seed, seed_in_name)
    return (records or Records(out)).get(config) is not None or in_folder(run_dir, config)


def in_folder(run_dir: Path, config: dict[str, Any]) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``config``."""
    previous = run_dir / "config.json"
    return (
        (run_dir / "metrics.json").exists()
        and previous.exists()
        and json.loads(previous.read_text()) == config
    )


CURVE_WINDOW = 10  # steps per point of a record's loss curve


def loss_curve(losses: list[list[float]], window: int = CURVE_WINDOW) -> list[float]:
    """The training loss as the mean of each ``window`` steps (``[[step, loss], ...]`` in, one value per
    window out, the last window possibly shorter): runs.json keeps it for the convergence claims."""
    values = [float(loss) for _, loss in losses]
    return [
        round(sum(values[i : i + window]) / len(values[i : i + window]), 4)
        for i in range(0, len(values), window)
    ]


def run_row(
    model: str,
    task: str,
    budget: dict[str, Any],
    row: Row,
    out: Path,
    seed: int,
    reuse: bool = False,
    threads: int | None = None,
    seed_in_name: bool = False,
    records: Records | None = None,
    measure: Any = None,
) -> dict[str, Any]:
    run_dir, config = run_config(model, task, budget, row, out, seed, seed_in_name)
    kept = records.get(config) if records is not None and reuse else None
    if (
        kept is not None and "loss_curve" not in kept and records is not None and in_folder(run_dir, config)
    ):  # a record made before curves were kept, whose run folder is still here: take its curve
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
        kept = {**kept, "loss_curve": loss_curve(history["loss"])}
        records.put(config, kept)
    if kept is not None:
        return {**kept, "method": row.label, "options": row.options}
    reused = reuse and finished(model, task, budget, row, out, seed, seed_in_name, records)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not reused:
        (run_dir / "metrics.json").unlink(missing_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=1))
    cmd = [
        sys.executable,
        "-m",
        "deltatune.cli",
        "train",
        "--config",
        str(run_dir / "config.json"),
        "--no-progress",
    ]
    started = time.time()
    if not reused:  # --reuse: a finished run of exactly this config is taken as it is
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{row.label} on {task} failed:\n{proc.stderr[-3000:]}")
    record = json.loads((run_dir / "metrics.json").read_text())
    main = record["main_metric"]
    validation = record.get("validation")
    result = {
        "task": task,
        "model": model,
        "method": row.label,
        "method_name": row.method,
        "trainable_parameters": record["trainable_parameters"],
        "stored_bytes": record["stored_bytes"],
        "main_metric": main,
        "metric": round(record["metrics"][main], 2),
        "metrics": {k: round(v, 4) for k, v in record["metrics"].items()},
        "train_seconds": record["train_seconds"],
        "peak_memory_MiB": round(record["peak_memory_bytes"] / 2**20),
        "steps": budget["steps"],
        "eval_limit": budget.get("eval_limit"),
        "batch_size": budget["batch_size"],
        "lr": record["config"]["lr"],  # as it ran: the method's own where the row names none
        "validation": round(validation[main], 2) if validation else None,
        "fields": row.fields,
        "options": row.options,
        "seed": seed,
        "wall_seconds": record.get("wall_seconds") if reused else round(time.time() - started, 1),
        "run": str(run_dir.relative_to(out)),
        "loss_curve": loss_curve(record["history"]["loss"]),
    }
    if record.get("before"):  # the base's metrics on the same eval set (a row with eval_before)
        result["before"] = {k: round(v, 4) for k, v in record["before"].items()}
    if measure is not None:  # a suite's own measurement of the run (causal.py: forgetting)
        result.update(measure(result, run_dir))
    if records is not None:
        records.put(config, result)
    return result


Job = tuple[str, str, dict[str, Any], Row, int]


def tune(
    preset: dict[str, Any], rows: list[Row], args: argparse.Namespace, out: Path, execute: Any
) -> dict[str, float]:
    """Run every row's learning-rate grid on the preset's ``grid_task`` with the first seed; write
    ``grid.json`` and ``grid.md`` after each row; return the chosen rate by row label."""
    task = preset.get("grid_task") or next(iter(preset["tasks"]))
    budget = preset["tasks"][task]
    if not budget.get("validation"):
        raise SystemExit(f"--lr-grid: the preset's {task} budget holds no validation examples out")
    multipliers = tuple(args.lr_grid) or GRID
    chosen: dict[str, float] = {}
    path = out / "grid.json"
    # every row's grid so far, this run's rows replacing theirs (an --only run keeps the others')
    grids: dict[str, dict[str, Any]] = (
        {g["method"]: g for g in json.loads(path.read_text())} if path.exists() else {}
    )
    recorded = {label: g["centre"] for label, g in grids.items()}
    order = [row.label for row in preset["rows"]]
    for row in rows:
        centred = centre(row, recorded)
        points = grid_rows(row, multipliers, recorded)
        results = execute([(preset["model"], task, budget, point, args.seeds[0]) for point in points], True)
        for point, result in zip(points, results, strict=True):
            result.setdefault("lr", point.options["lr"])
        for _ in range(EXTEND):  # the best rate at an end of the grid: one more step beyond it
            beyond = further(row, results, centred)
            if beyond is None:
                break
            (extra,) = execute([(preset["model"], task, budget, beyond, args.seeds[0])], True)
            extra.setdefault("lr", beyond.options["lr"])
            results.append(extra)
        grids[row.label] = summary(row, results, centred)
        chosen[row.label] = choose(row, results, centred)["lr"]
        ordered = sorted(
            grids.values(), key=lambda g: order.index(g["method"]) if g["method"] in order else len(order)
        )
        path.write_text(json.dumps(ordered, indent=1))
        command = f"python benchmarks/compare.py --preset {args.preset} --lr-grid"
        (out / "grid.md").write_text(grid_markdown(ordered, task, budget["validation"], command))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<preset>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed of every row")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each with cores/JOBS threads (peak memory stays per run; times do not compare "
        "across job counts)",
    )
    parser.add_argument("--only", nargs="+", help="run only rows whose label contains one of these words")
    parser.add_argument("--skip", nargs="+", help="leave out rows whose label starts with one of these words")
    parser.add_argument("--tasks", nargs="+", help="run only these tasks of the preset")
    parser.add_argument(
        "--lr-grid",
        type=float,
        nargs="*",
        help="first choose each row's learning rate: one run (first seed) per rate centre x M on the "
        "preset's grid task, the best validation metric wins (benchmarks/lr_grid.py; no M: 1/3 1 3 10); "
        "then every task and seed at the chosen rate. Writes grid.json and grid.md",
    )
    parser.add_argument("--grid-only", action="store_true", help="with --lr-grid: stop after the grid")
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="with --reuse: tabulate the finished runs of these configs, run nothing (lists the rest)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take rows whose run folder holds a finished run of exactly the same config, or runs.json "
        "its result (an earlier session's)",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    out = Path(args.out or ROOT / "benchmarks" / "results" / args.preset)
    out.mkdir(parents=True, exist_ok=True)
    groups = [preset, *preset.get("extra", [])]
    if args.preset == "gpu":
        import torch

        if not torch.cuda.is_available():
            parser.error("--preset gpu needs a GPU (torch.cuda.is_available() is False)")
    records = Records(out)
    hooks = importlib.import_module(preset["prepare"]) if "prepare" in preset else None
    if hooks is not None:  # the suite's data, written the way a user brings theirs
        paths = {k: os.path.relpath(v, ROOT) for k, v in hooks.prepare(out).items()}
        for group in groups:
            group["tasks"] = {task: {**budget, **paths} for task, budget in group["tasks"].items()}
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    seed_in_name = len(args.seeds) > 1 or args.lr_grid is not None

    def one(job: Job, tolerate: bool) -> dict[str, Any]:
        model, task, budget, row, seed = job
        print(f"{task}: {row.label} (seed {seed}) ...", flush=True)
        try:
            result = run_row(
                model,
                task,
                budget,
                row,
                out,
                seed,
                args.reuse or args.lr_grid is not None,
                threads,
                seed_in_name,
                records,
                getattr(hooks, "measure", None),
            )
        except RuntimeError as e:
            if not tolerate:
                raise
            print(f"  {row.label}: failed: {str(e)[-400:]}", flush=True)
            error = str(e)[-400:]
            return {"task": task, "method": row.label, "seed": seed, "validation": None, "error": error}
        print(
            f"  {result['task']}: {result['method']} (seed {result['seed']}): {result['main_metric']} "
            f"{result['metric']:.2f}"
            + (f" (validation {result['validation']:.2f})" if result.get("validation") is not None else "")
            + f", {result['stored_bytes']:,} bytes, {result['train_seconds']:.0f} s",
            flush=True,
        )
        return result

    def execute(jobs: list[Job], tolerate: bool = False) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            return list(pool.map(lambda job: one(job, tolerate), jobs))

    def selected(row: Row) -> bool:
        return (not args.only or any(w.lower() in row.label.lower() for w in args.only)) and (
            not args.skip or not any(row.label.lower().startswith(w.lower()) for w in args.skip)
        )

    if args.lr_grid is not None:
        rows = [row for row in preset["rows"] if selected(row)]
        chosen = tune(preset, rows, args, out, execute)
        if args.grid_only:
            return 0
        groups = [
            {**preset, "rows": [replace(r, options={**r.options, "lr": chosen[r.label]}) for r in rows]}
        ]
    jobs = [
        (group["model"], task, budget, row, seed)
        for group in groups
        for row in group["rows"]
        for task, budget in group["tasks"].items()
        for seed in args.seeds
        if selected(row)
        if not args.tasks or task in args.tasks
    ]
    if args.finished_only:
        done = [j for j in jobs if finished(j[0], j[1], j[2], j[3], out, j[4], seed_in_name, records)]
        for job in jobs:
            if job not in done:
                print(f"not run: {job[1]}: {job[3].label} (seed {job[4]})")
        jobs = done
    # A run that fails (diverged, say) is listed under the tables, not the end of the suite: rerunning
    # would fail the same way, and the other runs' results stand.
    outcomes = execute(jobs, True)
    results = [r for r in outcomes if "error" not in r]
    failures = [r for r in outcomes if "error" in r]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    command = (
        "python benchmarks/compare.py --preset "
        + args.preset
        + (" --lr-grid" + "".join(f" {m:g}" for m in args.lr_grid) if args.lr_grid is not None else "")
        + (f" --only {' '.join(args.only)}" if args.only else "")
        + (f" --skip {' '.join(args.skip)}" if args.skip else "")
        + (f" --tasks {' '.join(args.tasks)}" if args.tasks else "")
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0] else "")
        + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
        + (" --reuse" if args.reuse else "")
    )
    table = markdown(results, command) + "".join(
        f"\nFailed: {r['method']} on {r['task']}, seed {r['seed']}: {r['error'].strip().splitlines()[-1]}\n"
        for r in failures
    )
    (out / "results.md").write_text(table)
    if results:
        scatter(results, out / "scatter.png")
    after = preset.get("after")
    if after:  # a per-preset analysis script next to this one, called with the results folder
        importlib.import_module(after).main(out)
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
