"""Issue 14's GPU tables: training step, eval forward and routed adapters, deltatune against PEFT and
the frozen-base floor, on a bf16 base, interleaved, timed with CUDA events (wall clock on the CPU).

Shapes (random init, no download): ``llama-1b`` (Llama-3.2-1B: 16 layers, d=2048, FFN 8192, vocab
128,256) at ``--batch`` × ``--seq`` (8 × 1024) and ``smollm2`` (SmolLM2-135M: 30 layers, d=576) at 16 ×
512. Every row has its own copy of the model; one round runs one step of each row in turn, and a row's
time is the median over ``--rounds`` rounds of its ratio to the floor's time in the same round.

Rows (``--rows``):

* ``floor``: the frozen base, backward through the activations only (no weight gradient);
* ``full``: full fine-tuning (AdamW over every weight);
* ``lora``: deltatune LoRA r=16, alpha 32, all 7 projections, defaults (float32 parameters, the
  adapter computing in bf16: ``deltatune.kernels.lowrank``'s "input" precision);
* ``lora-fp32``: the same computing in float32 (``dt.adapter_precision_as("adapter")``);
* ``peft-lora`` / ``peft-lora-bf16``: PEFT's LoRA with its defaults (``autocast_adapter_dtype=True``:
  float32 adapters) and with ``autocast_adapter_dtype=False`` (adapters in bf16);
* ``vblora`` / ``peft-vblora``: VB-LoRA r=4, 256 vectors of 64, top-2;
* ``eval`` rows (``--eval``): the unmerged forward of ``lora`` and ``peft-lora`` and the merged one,
  against the base's forward; ``route`` rows (``--route``): eight LoRA adapters, one per row of a 32 ×
  128 batch (``dt.route``; PEFT's ``adapter_names``), against the base's forward.

Peak memory is ``torch.cuda.max_memory_allocated`` over one step of each row, measured apart before
the timed rounds; ``estimate_gb`` beside it is ``deltatune estimate``'s total for the row (what it
counts: weights, gradients, AdamW state, activations kept for backward; not the allocator's slack or
kernels' temporary buffers).

    python benchmarks/gpu.py --shape llama-1b --rounds 8 --json /tmp/gpu-1b.json
    python benchmarks/gpu.py --shape smollm2 --rounds 8 --eval --route --json /tmp/gpu-135m.json
    .venv/bin/python benchmarks/gpu.py --device cpu --shape tiny --rounds 2   # plumbing check on CPU
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from torch import nn

import deltatune as dt

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {
        "config": dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=True,
        ),
        "batch": 8,
        "seq": 1024,
    },
    "smollm2": {
        "config": dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
        ),
        "batch": 16,
        "seq": 512,
    },
    "tiny": {
        "config": dict(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        "batch": 2,
        "seq": 32,
    },
}
TRAIN_ROWS = ("floor", "full", "lora", "lora-fp32", "peft-lora", "peft-lora-bf16", "vblora", "peft-vblora")


def base_model(shape: str, device: torch.device) -> Any:
    """A randomly initialised bf16 Llama of ``shape`` (a transformers model: typed Any)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(max_position_embeddings=4096, **SHAPES[shape]["config"])
    model: Any = transformers.LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=torch.bfloat16)


class Row:
    """One configuration: its model, optimizer, and whether it is the floor or PEFT's."""

    def __init__(self, name: str, model: Any, params: list[nn.Parameter], floor: bool = False) -> None:
        self.name = name
        self.model = model.train()
        self.floor = floor
        self.opt = torch.optim.AdamW(params, lr=1e-5) if params else None
        self.precision = "adapter" if name == "lora-fp32" else "input"

    def step(self, ids: torch.Tensor) -> None:
        with dt.adapter_precision_as(self.precision):
            if self.floor:
                emb = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
                loss = self.model(inputs_embeds=emb, labels=ids).loss
            else:
                loss = self.model(input_ids=ids, labels=ids).loss
            loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def make_row(name: str, base: nn.Module) -> Row:
    model = copy.deepcopy(base)
    if name == "floor":
        model.requires_grad_(False)
        return Row(name, model, [], floor=True)
    if name == "full":
        return Row(name, model, list(model.parameters()))
    if name in ("lora", "lora-fp32"):
        dt.inject(model, dt.LoRA(rank=16, alpha=32), targets=TARGETS)
        return Row(name, model, dt.trainable_parameters(model))
    if name == "vblora":
        dt.inject(model, dt.VBLoRA(rank=4, num_vectors=256, vector_length=64), targets=TARGETS)
        return Row(name, model, dt.trainable_parameters(model))
    import peft

    config: Any
    if name == "peft-vblora":
        config = peft.VBLoRAConfig(r=4, num_vectors=256, vector_length=64, topk=2, target_modules=TARGETS)
        wrapped = peft.get_peft_model(model, config)
    else:
        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
        wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=name == "peft-lora")
    return Row(name, wrapped, [p for p in wrapped.parameters() if p.requires_grad])


class Clock:
    """Seconds of ``fn()``: CUDA events on a GPU (synchronised), wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return float(begin.elapsed_time(end)) / 1000.0


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def interleaved(
    fns: dict[str, Callable[[], Any]], reference: str, rounds: int, clock: Clock
) -> dict[str, dict[str, float]]:
    """Median time and median per-round ratio to ``reference`` of every entry, run in turn."""
    for fn in fns.values():
        fn()  # warm-up (kernels, caches, the optimizer's state)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(clock(fn))
    return {
        name: {
            "seconds": round(statistics.median(t), 5),
            "ratio": round(statistics.median(a / b for a, b in zip(t, times[reference], strict=True)), 3),
        }
        for name, t in times.items()
    }


def estimated_gb(name: str, base: nn.Module, batch: int, seq: int) -> float:
    """``deltatune estimate``'s total for the row (weights, gradients, AdamW state, activations kept
    for backward; attention as the model is configured), in GB, to set beside the measured peak."""
    from deltatune.runtime.estimate import estimate

    method: Any = name if name in ("floor", "full") else None
    if name.endswith("vblora"):
        method = dt.VBLoRA(rank=4, num_vectors=256, vector_length=64, topk=2)
    elif method is None:
        method = dt.LoRA(rank=16, alpha=32)
    targets = None if isinstance(method, str) else TARGETS
    return round(estimate(base, method, targets=targets, batch=batch, seq=seq).total_bytes / 1e9, 2)


def train_table(args: argparse.Namespace, device: torch.device, clock: Clock) -> dict[str, Any]:
    base = base_model(args.shape, device)
    batch, seq = args.batch or SHAPES[args.shape]["batch"], args.seq or SHAPES[args.shape]["seq"]
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=device)
    rows = {name: make_row(name, base) for name in args.rows}
    estimates = {name: estimated_gb(name, base, batch, seq) for name in args.rows}
    del base
    steps: dict[str, Callable[[], Any]] = {n: functools.partial(row.step, ids) for n, row in rows.items()}
    memory = {name: peak_bytes(step, device) for name, step in steps.items()}
    result: dict[str, dict[str, Any]] = interleaved(steps, args.rows[0], args.rounds, clock)
    for name in result:
        peak = memory[name]
        result[name]["tokens_per_s"] = round(batch * seq / result[name]["seconds"])
        result[name]["peak_gb"] = None if peak is None else round(peak / 1e9, 2)
        result[name]["estimate_gb"] = estimates[name]
    return {"batch": batch, "seq": seq, "rows": result}


def eval_table(args: argparse.Namespace, device: torch.device, clock: Clock) -> dict[str, Any]:
    import peft

    base = base_model(args.shape, device).eval()
    ids = torch.randint(0, base.config.vocab_size, (32, 512), device=device)
    ours = copy.deepcopy(base)
    dt.inject(ours, dt.LoRA(rank=16, alpha=32), targets=TARGETS)
    merged = dt.merge(copy.deepcopy(ours)).eval()
    ours.eval()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
    )
    fns: dict[str, Callable[[], Any]] = {
        name: functools.partial(m, input_ids=ids)
        for name, m in [("base", base), ("lora", ours), ("merged", merged), ("peft-lora", theirs)]
    }
    with torch.inference_mode():
        return interleaved(fns, "base", args.rounds, clock)


def route_table(args: argparse.Namespace, device: torch.device, clock: Clock) -> dict[str, Any]:
    import peft

    base = base_model(args.shape, device).eval()
    ids = torch.randint(0, base.config.vocab_size, (32, 128), device=device)
    names = [f"a{i % 8}" for i in range(32)]
    ours = copy.deepcopy(base)
    for i in range(8):
        dt.inject(ours, dt.LoRA(rank=16, alpha=32), targets=TARGETS, name=f"a{i}", seed=i)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    for i in range(1, 8):
        theirs.add_adapter(f"a{i}", config)
    ours.eval()
    theirs.eval()  # (PEFT refuses adapter_names in training mode)

    def routed() -> Any:
        with dt.route(ours, names):
            return ours(input_ids=ids)

    fns: dict[str, Callable[[], Any]] = {
        "base": lambda: base(input_ids=ids),
        "route": routed,
        "peft-route": lambda: theirs(input_ids=ids, adapter_names=names),
    }
    with torch.inference_mode():
        return interleaved(fns, "base", args.rounds, clock)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--rows", nargs="+", choices=TRAIN_ROWS, default=list(TRAIN_ROWS[:6]))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, help="default: the shape's")
    parser.add_argument("--seq", type=int, help="default: the shape's")
    parser.add_argument("--eval", action="store_true", help="also the unmerged/merged eval forward")
    parser.add_argument("--route", action="store_true", help="also eight routed adapters")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.rows[0] != "floor":
        args.rows = ["floor", *[r for r in args.rows if r != "floor"]]
    device = torch.device(args.device)
    clock = Clock(device)
    result: dict[str, Any] = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "rounds": args.rounds,
        "train": train_table(args, device, clock),
    }
    print(json.dumps(result["train"], indent=1), flush=True)
    if args.eval:
        result["eval"] = eval_table(args, device, clock)
        print(json.dumps(result["eval"], indent=1), flush=True)
    if args.route:
        result["route"] = route_table(args, device, clock)
        print(json.dumps(result["route"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
