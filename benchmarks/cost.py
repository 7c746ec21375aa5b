"""Memory and FLOPs per training step for full fine-tuning and PEFT methods at three model shapes.

Every number is an estimate of :mod:`deltatune.runtime.estimate` (a trace on the meta device, checked within
15 % against real CPU steps by ``tests/test_estimate.py``); none is a measurement. Base weights in
bf16 (adapters in float32, as deltatune trains them), AdamW, one step of 8 x 1024 tokens (the
decoder shapes) on every linear layer of the blocks. QLoRA is LoRA's row with the adapted linear
weights stored in NF4 (torchao's layout: 4 bits per weight plus an int8 scale per 64 weights and a
float32 scale per 256 of those: 4.13 bits per weight); its FLOPs are LoRA's (dequantisation not
counted).

    .venv/bin/python benchmarks/cost.py            # ~5 min on 2 CPU cores; writes benchmarks/results/cost/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt
from deltatune.runtime.estimate import Estimate, estimate, meta_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cost"
SHAPES = ("smollm2-135m", "llama-3.2-1b", "llama-2-7b")
BATCH, SEQ = 8, 1024
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)


def configs() -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("frozen-base floor", "floor"), ("full fine-tuning", "full")]
    rows += [(f"LoRA r={r}", dt.LoRA(rank=r, alpha=2 * r)) for r in (8, 16, 32, 64)]
    rows += [("DoRA r=16", dt.DoRA(rank=16, alpha=32))]
    rows += [("VB-LoRA r=4 h=256 b=64", dt.VBLoRA(rank=4, num_vectors=256, vector_length=64))]
    rows += [("prompt tuning n=20", dt.PromptTuning(num_virtual_tokens=20))]
    return rows


def qlora(model: nn.Module, lora: Estimate) -> Estimate:
    """LoRA's estimate with the adapted linear weights in NF4 instead of bf16."""
    adapted = [
        m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS
    ]
    bf16 = sum(w.numel() * w.element_size() for w in adapted)
    nf4 = int(sum(w.numel() for w in adapted) * NF4_BITS / 8)
    fields = {**lora.to_dict()}
    fields.pop("flops"), fields.pop("total_bytes")
    fields.update(label="QLoRA r=16 (NF4 base)", weight_bytes=lora.weight_bytes - bf16 + nf4)
    return Estimate(**fields)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for shape in SHAPES:
        model = meta_model(shape, dtype=torch.bfloat16)
        rows: list[Estimate] = []
        for label, method in configs():
            targets = None if isinstance(method, (str, dt.PromptTuning)) else TARGETS
            rows.append(estimate(model, method, targets=targets, batch=BATCH, seq=SEQ, label=label))
            print(shape, label, flush=True)
        rows.append(qlora(model, next(r for r in rows if r.label == "LoRA r=16")))
        floor = rows[0]
        for r in rows:
            results.append(
                {"shape": shape, **r.to_dict(), "flops_over_floor": round(r.flops / floor.flops, 4)}
            )
    (OUT / "cost.json").write_text(json.dumps(results, indent=1))
    (OUT / "cost.md").write_text(markdown(results))
    plot(results, OUT / "cost.png")
    print(markdown(results))


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        f"Estimates (deltatune.runtime.estimate), not measurements: one AdamW step at {BATCH} x {SEQ} "
        "tokens, bf16 base, float32 adapters. Made by `python benchmarks/cost.py`.",
        "",
        "| shape | configuration | trainable | stored MiB | weights GiB | grads + Adam GiB | activations GiB "
        "| total GiB | GFLOPs / token | FLOPs / floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = [
            r["shape"],
            r["label"],
            f"{r['trainable_parameters']:,}",
            f"{r['stored_bytes'] / 2**20:,.1f}",
            f"{r['weight_bytes'] / 2**30:.2f}",
            f"{(r['gradient_bytes'] + r['optimizer_bytes']) / 2**30:.2f}",
            f"{r['activation_bytes'] / 2**30:.2f}",
            f"{r['total_bytes'] / 2**30:.2f}",
            f"{r['flops'] / (r['batch'] * r['seq']) / 1e9:.3f}",
            f"{r['flops_over_floor']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SHAPES), figsize=(6 * len(SHAPES), 8), dpi=100, squeeze=False)
    parts = [
        ("weights", "weight_bytes"),
        ("grads + Adam", None),
        ("activations", "activation_bytes"),
    ]
    for col, shape in enumerate(SHAPES):
        rows = [r for r in results if r["shape"] == shape]
        labels = [r["label"] for r in rows]
        bottom = [0.0] * len(rows)
        ax = axes[0][col]
        for name, key in parts:
            values = [(r[key] if key else r["gradient_bytes"] + r["optimizer_bytes"]) / 2**30 for r in rows]
            ax.barh(labels, values, left=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_title(f"{shape}: memory of a step (GiB, estimate)")
        ax.invert_yaxis()
        if col == 0:  # one legend for the row, above the panels (never over a bar)
            fig.legend(
                *ax.get_legend_handles_labels(),
                loc="lower center",
                ncol=3,
                frameon=False,
                bbox_to_anchor=(0.5, 1.0),
            )
        ax2 = axes[1][col]
        ax2.barh(labels, [r["flops_over_floor"] for r in rows], color="tab:gray")
        ax2.axvline(1.0, color="k", lw=0.8)
        ax2.set_title("FLOPs of a step / frozen-base floor (estimate)")
        ax2.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
