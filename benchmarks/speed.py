"""Training-step and eval-forward cost of adapters vs the frozen-base floor, deltatune vs PEFT.

Rows (``--rows``): ``floor`` (frozen base, backward through activations only, no weight gradients),
``lora`` / ``peft-lora`` (rank ``--rank``), ``vblora`` / ``peft-vblora`` (rank ``--vb-rank``, h=256,
b=64, k=2), ``dora`` / ``peft-dora`` (DoRA at rank ``--rank``; goal: DoRA <= 1.10x our LoRA),
``lora-fa`` (LoRA-FA at rank ``--rank``: A frozen, so autograd saves A x (r values per token) instead
of each layer's input x), ``lora-ckpt`` (``lora`` with every block checkpointed: the memory saved and
the time paid), every linear layer of the blocks adapted.

The configurations run interleaved in one process (one step of each in turn, ``--rounds`` rounds)
and the script reports the median of the per-round ratios, because this machine's speed drifts by
±30 % between runs. Memory is measured as the bytes autograd saves for the backward pass (a
deterministic count, unlike process RSS, which cannot be split between interleaved configurations).

Model: a SmolLM2-135M-shaped Llama (random init; 30 layers, d=576) by default, every linear layer of
the blocks adapted. ``--small`` uses a 4-layer model for a quick look.

    .venv/bin/python benchmarks/speed.py --rounds 5                       # all rows, ~15 min on 2 cores
    .venv/bin/python benchmarks/speed.py --rows floor lora peft-lora --small  # a quick look
    .venv/bin/python benchmarks/speed.py --rows floor lora dora peft-dora lora-fa --rounds 7 \\
        --json benchmarks/results/speed/lora-family.json                  # issue 15's rows
"""

from __future__ import annotations

import argparse
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


def build(small: bool) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4 if small else 30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


class Run:
    def __init__(self, name: str, model: Any, params: list[nn.Parameter], floor: bool = False) -> None:
        self.name = name
        self.model = model
        self.params = params
        self.floor = floor
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        if self.floor:
            # No weight gradients at all: backward through the activations only.
            emb = self.model.get_input_embeddings()(ids).detach().requires_grad_(True)
            out: torch.Tensor = self.model(inputs_embeds=emb, labels=ids).loss
            return out
        out = self.model(input_ids=ids, labels=ids).loss
        return out

    def train_step(self, ids: torch.Tensor) -> float:
        self.model.train()  # (a checkpointed block recomputes only in training)
        start = time.perf_counter()
        self.loss(ids).backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def eval_step(self, ids: torch.Tensor) -> float:
        self.model.eval()
        start = time.perf_counter()
        with torch.inference_mode():
            self.model(input_ids=ids)
        return time.perf_counter() - start

    def saved_bytes(self, ids: torch.Tensor) -> int:
        total = 0
        self.model.train()

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss(ids)
        loss.backward()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        return total

    def kept(self, ids: torch.Tensor) -> Any:
        """What autograd keeps (each storage once, weights apart), by transformer block
        (``deltatune.runtime.estimate.kept_by_step``): under checkpointing nothing inside a block."""
        from deltatune import anatomy
        from deltatune.runtime.estimate import kept_by_step

        blocks = [self.model.get_submodule(p) for p in anatomy.describe(self.model).blocks]
        self.model.train()
        kept, loss = kept_by_step(self.model, lambda: self.loss(ids), blocks)
        loss.backward()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        return kept


ROWS = ("floor", "lora", "peft-lora", "vblora", "peft-vblora", "dora", "peft-dora", "lora-fa", "lora-ckpt")


def make_run(name: str, args: argparse.Namespace) -> Run:
    import peft

    model = build(args.small)
    if name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        return Run(name, model, [], floor=True)
    if name in ("lora", "lora-ckpt"):
        dt.inject(model, dt.LoRA(rank=args.rank, alpha=2 * args.rank), targets=TARGETS)
        if name == "lora-ckpt":  # every block checkpointed (deltatune train --activation-checkpointing)
            dt.checkpoint_blocks(model)
        return Run(name, model, dt.trainable_parameters(model))
    if name == "dora":
        dt.inject(model, dt.DoRA(rank=args.rank, alpha=2 * args.rank), targets=TARGETS)
        return Run(name, model, dt.trainable_parameters(model))
    if name == "lora-fa":
        dt.inject(model, dt.LoRAFA(rank=args.rank, alpha=2 * args.rank), targets=TARGETS)
        return Run(name, model, dt.trainable_parameters(model))
    if name == "vblora":
        dt.inject(model, dt.VBLoRA(rank=args.vb_rank, num_vectors=256, vector_length=64), targets=TARGETS)
        return Run(name, model, dt.trainable_parameters(model))
    if name in ("peft-lora", "peft-dora"):
        config: Any = peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, use_dora=name == "peft-dora"
        )
    else:
        config = peft.VBLoRAConfig(
            r=args.vb_rank, num_vectors=256, vector_length=64, topk=2, target_modules=TARGETS
        )
    wrapped = peft.get_peft_model(model, config)
    return Run(name, wrapped, [p for p in wrapped.parameters() if p.requires_grad])


def method_of(name: str, args: argparse.Namespace) -> Any:
    """The deltatune config of a row (None for PEFT's rows and the floor)."""
    return {
        "lora": dt.LoRA(rank=args.rank, alpha=2 * args.rank),
        "dora": dt.DoRA(rank=args.rank, alpha=2 * args.rank),
        "lora-fa": dt.LoRAFA(rank=args.rank, alpha=2 * args.rank),
        "vblora": dt.VBLoRA(rank=args.vb_rank, num_vectors=256, vector_length=64),
    }.get(name)


def flop_limits(names: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Each row's FLOPs over the floor's (deltatune.runtime.estimate): the ratio it would reach at the floor's
    arithmetic speed; PEFT's rows have the same arithmetic as ours."""
    from deltatune.runtime.estimate import estimate

    model = build(args.small)
    floor = estimate(model, "floor", batch=args.batch, seq=args.seq)
    out = {}
    for name in names:
        method = method_of(name.removeprefix("peft-"), args)
        if method is not None:
            row = estimate(model, method, targets=TARGETS, batch=args.batch, seq=args.seq)
            out[f"{name}/floor"] = round(row.flops / floor.flops, 4)
    return out


def median_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--vb-rank", type=int, default=4, help="VB-LoRA rank")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    import peft

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq))

    runs = [make_run(name, args) for name in args.rows]
    for run in runs:  # warm-up
        run.train_step(ids)
        run.eval_step(ids)
    train: dict[str, list[float]] = {r.name: [] for r in runs}
    evals: dict[str, list[float]] = {r.name: [] for r in runs}
    for i in range(args.rounds):
        order: list[Run] = runs if i % 2 == 0 else runs[::-1]  # no configuration always runs first
        for run in order:
            train[run.name].append(run.train_step(ids))
        for run in order:
            evals[run.name].append(run.eval_step(ids))
        print(
            f"round {i + 1}/{args.rounds}: " + ", ".join(f"{r.name} {train[r.name][-1]:.2f}s" for r in runs)
        )
    saved = {r.name: r.saved_bytes(ids) for r in runs}

    names = [r.name for r in runs]
    pairs = [(n, "floor") for n in names if n != "floor" and "floor" in names]
    pairs += [(n, f"peft-{n}") for n in names if f"peft-{n}" in names]
    pairs += [(n, "lora") for n in ("vblora", "dora", "lora-fa", "lora-ckpt") if {n, "lora"} <= set(names)]
    checkpointing: dict[str, Any] = {}
    if {"lora", "lora-ckpt"} <= set(names):  # memory saved by checkpointing, measured on real tensors
        plain = next(r for r in runs if r.name == "lora").kept(ids)
        ckpt = next(r for r in runs if r.name == "lora-ckpt").kept(ids)
        kept_plain = plain.total
        # backward recomputes one block at a time: its own tensors, as the plain step keeps them
        kept_ckpt = ckpt.outside() + sum(ckpt.inputs.values()) + plain.largest_block()
        checkpointing = {
            "lora_kept_MiB": round(kept_plain / 2**20, 1),
            "lora_checkpointed_kept_MiB": round(kept_ckpt / 2**20, 1),
            "kept_ratio": round(kept_ckpt / kept_plain, 4),
            "train_step_ratio": round(median_ratio(train, "lora-ckpt", "lora"), 4),
        }
    result: dict[str, Any] = {
        "model": "Llama 4x576 (small)" if args.small else "SmolLM2-135M-shaped Llama (30x576)",
        "lora_rank": args.rank,
        "vblora": {"rank": args.vb_rank, "num_vectors": 256, "vector_length": 64, "topk": 2},
        "batch": [args.batch, args.seq],
        "rounds": args.rounds,
        "train_step_ratio": {f"{a}/{b}": round(median_ratio(train, a, b), 4) for a, b in pairs},
        "eval_forward_ratio": {f"{a}/{b}": round(median_ratio(evals, a, b), 4) for a, b in pairs},
        "train_step_seconds_median": {k: round(statistics.median(v), 3) for k, v in train.items()},
        "saved_activation_MiB": {k: round(v / 2**20, 1) for k, v in saved.items()},
        # Beside each measured ratio to the floor: the ratio its FLOPs allow (deltatune.runtime.estimate).
        "flop_limit_ratio": flop_limits(names, args),
        # Each storage once: what autograd keeps with and without every block checkpointed.
        **({"activation_checkpointing": checkpointing} if checkpointing else {}),
        "torch": torch.__version__,
        "peft": peft.__version__,
    }
    show: Callable[[str], None] = print
    show(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
