"""``deltatune estimate``: the memory and FLOPs of one training step, before running it.

    deltatune estimate --model llama-2-7b --method lora --rank 16 --batch 8 --seq 1024 --precision bf16

prints the frozen-base floor, full fine-tuning and the method side by side (see
:mod:`deltatune.runtime.estimate`: a trace on PyTorch's meta device, no weights needed for the named shapes).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from ..contract import REGISTRY
from ..runtime.estimate import ATTENTION, FLOOR, FULL, HEAD, SHAPES, Estimate, estimate, meta_model
from ..runtime.quant import FORMATS
from .hints import canonical_method

__all__ = ["run_estimate"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


#: Adds a method's fields as flags to a parser (``deltatune.cli.main.add_method_flags``).
MethodFlags = Callable[[argparse.ArgumentParser, "str | None"], None]


def _parser(method: str | None, method_flags: MethodFlags) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltatune estimate",
        description="Memory and FLOPs of one training step of a method, against the frozen-base floor and "
        "full fine-tuning, from the model's shapes (nothing runs on real tensors). The frozen-base floor: "
        "the base model with every weight frozen and no adapter, the backward pass going through the "
        "activations only; no method can cost less, so each row's FLOPs are given relative to it. A "
        "method's fields become flags once --method is given.",
    )
    p.add_argument(
        "--model",
        default="minilm",
        help=f"a model shape ({', '.join(sorted(SHAPES))}) or a local folder holding a config.json "
        "(default minilm)",
    )
    p.add_argument(
        "--method",
        default="lora",
        metavar="METHOD",
        help=f"a registered method ({', '.join(sorted(REGISTRY))}), {FULL} or {HEAD} (default lora)",
    )
    p.add_argument(
        "--targets", nargs="+", metavar="MODULE", help="modules to adapt (default: as deltatune.inject)"
    )
    p.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--seq", type=int, default=512, help="tokens per example (default 512)")
    p.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="dtype of the base model's weights (adapters stay float32) (default fp32)",
    )
    p.add_argument(
        "--quantize",
        choices=FORMATS,
        help="the frozen base's linear layers in 4 bits (nf4: QLoRA, QPiSSA; about 4.13 bits a value) on "
        "every row but full fine-tuning (default: the base at --precision)",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTION,
        help="how attention is computed: eager keeps every head's T x T probabilities for backward; sdpa "
        "(PyTorch's fused kernel, transformers' default) and flash (FlashAttention, the GPU's "
        "memory-efficient kernel) keep O(T) per head (default: what the model is configured with)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="each transformer block checkpointed (deltatune train --activation-checkpointing): its inputs "
        "kept, its activations recomputed in backward",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    method_flags(p, method)
    return p


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(rows: list[Estimate]) -> str:
    """The rows as a Markdown table, FLOPs relative to the first row (the floor)."""
    floor = rows[0]
    lines = [
        f"one training step at {floor.batch} x {floor.seq} tokens "
        "(GiB; AdamW state in the parameters' dtype)",
        "",
        "| configuration | trainable params | stored MiB | weights | gradients | optimizer | activations "
        "| total | GFLOPs/step | FLOPs / floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            r.label,
            f"{r.trainable_parameters:,}",
            f"{r.stored_bytes / 2**20:.2f}",
            _gib(r.weight_bytes),
            _gib(r.gradient_bytes),
            _gib(r.optimizer_bytes),
            _gib(r.activation_bytes),
            _gib(r.total_bytes),
            f"{r.flops / 1e9:.1f}",
            f"{r.flops / floor.flops:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_estimate(argv: list[str], method_flags: MethodFlags) -> int:
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--method")
    known, _ = probe.parse_known_args(argv)
    method_name = canonical_method(known.method or "lora", (*REGISTRY, FULL, HEAD))
    args = _parser(method_name, method_flags).parse_args(argv)
    args.method = method_name
    fields = {
        k[len("field__") :]: v for k, v in vars(args).items() if k.startswith("field__") and v is not None
    }
    model = meta_model(args.model, dtype=PRECISIONS[args.precision])
    if args.method in REGISTRY:
        from ..contract import method_from_config

        method: Any = method_from_config(args.method, fields)
        label = f"{args.method} " + " ".join(f"{k}={v}" for k, v in fields.items())
    else:
        method, label = args.method, args.method
    if args.quantize and method == FULL:
        raise ValueError("--quantize: full fine-tuning trains every weight, which a 4-bit base freezes")
    shape = {
        "batch": args.batch,
        "seq": args.seq,
        "attention": args.attention,
        "activation_checkpointing": args.activation_checkpointing,
    }
    four = {"quantize": args.quantize}
    suffix = f" ({args.quantize} base)" if args.quantize else ""
    rows = [
        estimate(model, FLOOR, **shape, **four, label="frozen-base floor" + suffix),
        estimate(model, FULL, **shape, label="full fine-tuning"),
    ]
    if method != FULL:
        rows.append(
            estimate(model, method, targets=args.targets, **shape, **four, label=label.strip() + suffix)
        )
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    else:
        first = rows[0]
        logits = f"; the loss keeps the logits in {first.logits_dtype}" if first.logits_dtype else ""
        ckpt = "; every block checkpointed" if first.activation_checkpointing else ""
        print(f"{args.model} ({args.precision}); attention: {first.attention}{logits}{ckpt}")
        print(table(rows))
        print(
            "counted: weights, gradients, AdamW's two moments and the activations autograd keeps for "
            "backward (each storage once); not counted: the allocator's slack and the temporary buffers "
            "of a kernel, which add to a measured peak"
        )
        print(
            "frozen-base floor: every weight frozen, no adapter; the backward pass goes through the "
            "activations only, so no method costs less"
        )
    return 0
