"""PiSSA's init cost: full SVD vs the seeded randomized SVD on a 4096 x 11008 matrix (a Llama-7B MLP).

The matrix has a power-law spectrum (σ_i ∝ i^-0.7 plus a flat noise floor), as trained weights do; a
random Gaussian matrix (flat spectrum) is the worst case for any randomized method and not what
PiSSA sees. The configurations alternate (full, randomized, full, ...) for ``--rounds`` rounds and
the script reports the median of the per-round time ratios, plus the reconstruction error
``‖W − U_r S_r V_rᵀ‖_F / ‖W‖_F`` of each (the full SVD's is the optimum).

    .venv/bin/python benchmarks/svd_init.py                  # ~6 min on 2 CPU cores
    .venv/bin/python benchmarks/svd_init.py --rows 1024 --cols 2752 --rounds 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from deltatune.methods.lowrank.pissa import randomized_svd

ROOT = Path(__file__).resolve().parents[1]


def matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    # U diag(s) V with random orthonormal-ish factors: Gaussian columns scaled (QR of a 4096 x 4096
    # block is affordable; the column side uses a Gaussian sketch, which keeps the decay).
    Q, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    spectrum = torch.arange(1, k + 1, dtype=torch.float32) ** -0.7
    V = torch.randn(k, cols, generator=g) / cols**0.5
    W = (Q * spectrum) @ V
    out: torch.Tensor = W + 1e-3 * torch.randn(rows, cols, generator=g) / cols**0.5
    return out


def error(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    return float((W - (U * S) @ Vh).norm() / W.norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--niter", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "pissa" / "svd_init.json"))
    args = parser.parse_args(argv)
    W = matrix(args.rows, args.cols, 0)
    times: dict[str, list[float]] = {"full": [], "randomized": []}
    errors: dict[str, float] = {}
    for i in range(args.rounds):
        start = time.perf_counter()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        times["full"].append(time.perf_counter() - start)
        errors["full"] = error(W, U[:, : args.rank], S[: args.rank], Vh[: args.rank])
        del U, S, Vh
        start = time.perf_counter()
        g = torch.Generator().manual_seed(i)
        U, S, Vh = randomized_svd(W, args.rank, niter=args.niter, oversample=8, generator=g)
        times["randomized"].append(time.perf_counter() - start)
        errors["randomized"] = error(W, U, S, Vh)
        print(
            f"round {i + 1}/{args.rounds}: full {times['full'][-1]:.1f} s, "
            f"randomized {times['randomized'][-1]:.2f} s",
            flush=True,
        )
    speedup = statistics.median(f / r for f, r in zip(times["full"], times["randomized"], strict=True))
    result = {
        "matrix": [args.rows, args.cols],
        "rank": args.rank,
        "niter": args.niter,
        "rounds": args.rounds,
        "seconds_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "speedup_median": round(speedup, 1),
        "relative_error": {k: round(v, 6) for k, v in errors.items()},
        "error_ratio_randomized_over_full": round(errors["randomized"] / errors["full"], 4),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
