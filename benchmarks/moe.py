"""LoRA on the fused experts of a MoE model: the cost of a training step, and what autograd keeps.

Rows, every one a LoRA of rank ``--rank`` (alpha = 2 r) on a Mixtral-shaped model (random init):

* ``attention``: the attention projections only (what adapting modules by name gives on a model
  whose experts are fused);
* ``experts``: the attention projections and every expert's ``gate_up_proj`` and ``down_proj``
  (deltatune: tokens grouped by expert, ``s·(x Aᵀ)Bᵀ`` per expert, no dense update formed);
* ``peft-experts``: the same adapter through PEFT's ``target_parameters`` (which builds ``W + s·B A``
  of the whole expert stack in every forward);
* ``floor``: the frozen base (backward through the activations only).

The rows run interleaved in one process, in the opposite order every other round (this machine's
speed drifts by ±30 % between runs), and the table gives the median of the per-round ratios.
Memory is what autograd keeps for the backward pass: each storage once, the parameters' excluded
(deterministic, unlike process RSS, which interleaved rows cannot split).

    .venv/bin/python benchmarks/moe.py --rounds 7 --json benchmarks/results/moe/experts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_json  # type: ignore[import-not-found]
from speed import Run  # type: ignore[import-not-found]

import deltatune as dt

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
ROWS = ("floor", "attention", "experts", "peft-experts")


def build(args: argparse.Namespace) -> Any:
    cfg = transformers.MixtralConfig(
        vocab_size=8192,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


def make_run(name: str, args: argparse.Namespace) -> Run:
    model = build(args)
    rank = args.rank
    if name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        return Run(name, model, [], floor=True)
    if name == "peft-experts":
        import peft

        config = peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=ATTENTION, target_parameters=EXPERTS
        )
        theirs = peft.get_peft_model(model, config)
        return Run(name, theirs, [p for p in theirs.parameters() if p.requires_grad])
    targets = ATTENTION + (EXPERTS if name == "experts" else [])
    dt.inject(model, dt.LoRA(rank=rank, alpha=2 * rank), targets=targets)
    return Run(name, model, dt.trainable_parameters(model))


def kept_bytes(run: Run, ids: torch.Tensor) -> int:
    """The bytes of the storages autograd keeps for the backward pass, each storage once, the model's
    parameters excluded (a view of a frozen weight, ``W[e]``, costs nothing; PEFT's ``W + s·B A`` of
    the whole stack does): the estimator's rule (deltatune.runtime.estimate)."""
    params = {p.untyped_storage().data_ptr() for p in run.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run.loss(ids)
    loss.backward()
    if run.opt is not None:
        run.opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--json")
    args = p.parse_args(argv)
    runs = {name: make_run(name, args) for name in args.rows}
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    saved = {name: kept_bytes(run, ids) for name, run in runs.items()}
    for run in runs.values():  # warm-up
        run.train_step(ids)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]
        for name, run in order:
            times[name].append(run.train_step(ids))
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
            flush=True,
        )

    def ratio(a: str, b: str) -> float | None:
        if a not in times or b not in times:
            return None
        return round(statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)), 3)

    result: dict[str, Any] = {
        "model": {k: getattr(args, k) for k in ("hidden", "layers", "experts", "batch", "seq", "rank")},
        "rounds": args.rounds,
        "seconds_per_step_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "kept_for_backward_MiB": {k: round(v / 2**20, 1) for k, v in saved.items()},
        "trainable": {k: sum(p.numel() for p in run.params) for k, run in runs.items()},
        "ratios": {
            "experts / attention": ratio("experts", "attention"),
            "attention / floor": ratio("attention", "floor"),
            "experts / floor": ratio("experts", "floor"),
            "peft-experts / experts": ratio("peft-experts", "experts"),
        },
    }
    print(json.dumps(result, indent=1))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
