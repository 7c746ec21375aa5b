"""Many adapters in one batch: ``deltatune.route`` against PEFT's ``adapter_names``, and the base.

A SmolLM2-135M-shaped Llama (random init; 30 layers, d=576), ``--adapters`` LoRA adapters (rank
``--rank``) on every linear layer of the blocks, one eval forward (no autograd) of a ``--batch`` ×
``--seq`` batch in which the rows cycle through the adapters. Rows (interleaved, one forward of each per
round, ``--rounds`` rounds, the last of ``--repeat`` calls timed; the median of the per-round ratios to
the base, because this machine's speed drifts by ±30 % between runs):

* ``base``: the model without adapters (``deltatune.disabled``);
* ``one``: one adapter active for every row (deltatune);
* ``route``: every row its own adapter, ``with dt.route(model, names)``;
* ``peft-route``: the same adapters in PEFT, ``model(ids, adapter_names=names)``.

With ``--forwards K`` each call runs K forwards, the routed ones in one ``route`` block (as around a
generation loop, where the block's stacked factors are built once): ``--seq 1 --forwards 16`` is a
decoding step's shape.

Issue 14's goal on CPU: eight routed adapters at most 1.15× the base, and faster than PEFT's.

    .venv/bin/python benchmarks/route.py --rounds 7 --json benchmarks/results/speed/route.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from speed import TARGETS, build
from torch import nn

import deltatune as dt


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """The time of the last of ``repeat`` calls: the steady state. (On the CPU, the first forward
    after another model's can cost several times more: oneDNN rebuilds its cached kernels for the
    small per-adapter GEMMs. Whichever row runs after another model's pays it, so the first call of
    each row in a round is a warm-up.)"""
    for _ in range(repeat - 1):
        fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours(args: argparse.Namespace) -> nn.Module:
    model: nn.Module = build(small=args.small)
    for i in range(args.adapters):
        dt.inject(model, dt.LoRA(rank=args.rank, alpha=2 * args.rank), targets=TARGETS, name=f"a{i}", seed=i)
        with torch.no_grad():  # trained-looking adapters (B = 0 at init would add zeros)
            for layer in dt.attachment_of(model).layers(f"a{i}").values():
                factor: Any = layer.lora_B
                factor.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(i))
    return model.eval()


def peft_model(args: argparse.Namespace) -> Any:
    import peft

    config = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False
    )
    model: Any = peft.get_peft_model(build(small=args.small), config, adapter_name="a0")
    for i in range(1, args.adapters):
        model.add_adapter(f"a{i}", config)
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--forwards",
        type=int,
        default=1,
        help="forwards per call, all in one route() block (a decoding loop: --seq 1 --forwards 16)",
    )
    parser.add_argument("--small", action="store_true", help="a 4-layer model, for a quick look")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--repeat", type=int, default=2, help="calls per row and round; the last is timed")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq))
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    model = ours(args)
    rows: dict[str, Callable[[], Any]] = {}

    k = args.forwards

    def base() -> Any:
        with dt.disabled(model):
            return [model(ids) for _ in range(k)]

    def one() -> Any:
        dt.set_active(model, "a0")
        return [model(ids) for _ in range(k)]

    def routed() -> Any:
        with dt.route(model, names):  # one block for the k forwards, as around a generation loop
            return [model(ids) for _ in range(k)]

    rows = {"base": base, "one": one, "route": routed}
    if not args.no_peft:
        other = peft_model(args)
        rows["peft-route"] = lambda: [other(ids, adapter_names=names) for _ in range(k)]
    times: dict[str, list[float]] = {k: [] for k in rows}
    with torch.no_grad():
        for fn in rows.values():  # warm-up
            fn()
        for r in range(args.rounds):
            for name, fn in rows.items():
                times[name].append(timed(fn, args.repeat))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    ratios = {
        name: statistics.median(t / b for t, b in zip(times[name], times["base"], strict=True))
        for name in rows
        if name != "base"
    }
    if "peft-route" in rows:
        ratios["route / peft-route"] = statistics.median(
            a / b for a, b in zip(times["route"], times["peft-route"], strict=True)
        )
    result = {
        "shape": "smollm2-135m (4 layers)" if args.small else "smollm2-135m",
        "adapters": args.adapters,
        "rank": args.rank,
        "batch": args.batch,
        "seq": args.seq,
        "forwards_per_block": args.forwards,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "threads": torch.get_num_threads(),
        "median_seconds": {k: round(statistics.median(v), 4) for k, v in times.items()},
        "median_ratio_to_base": {k: round(v, 3) for k, v in ratios.items()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
