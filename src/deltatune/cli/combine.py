"""``deltatune combine``: several saved adapters of one base combined into one adapter folder.

    deltatune combine runs/sst2/adapter runs/mrpc/adapter --weights 0.6 0.4 --how ties --density 0.5 \\
        --keep-modules-of 1 --out runs/merged

The adapters load onto the base the first one records (each checked against it: the same base
weights, by fingerprint), are combined by :func:`deltatune.combine` (``--how``: cat, linear, svd,
ties, dare_linear, dare_ties, magnitude_prune) and the result is saved as a normal adapter with the
harness record of the adapter whose head it keeps (``--keep-modules-of``, default the first), so that
``deltatune eval``, ``chat``, ``export`` and ``dt.load`` read it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..arithmetic import HOW, combine
from ..formats.files import check_out
from ..formats.io import CONFIG_NAME, load, read_config
from ..train.provenance import recorded
from ..train.provenance import save as harness_save
from .adapter import _load_adapted, _run_options, add_quantize_flag, documented_parser

__all__ = ["add_parser", "run_combine"]


def add_parser(sub: Any) -> None:
    """Add ``combine`` to the ``deltatune`` command's subparsers."""
    s = documented_parser(sub, "combine", "combine saved adapters into one (TIES, DARE, SVD, ...)", __doc__)
    s.add_argument(
        "adapters", nargs="+", help="adapter folders (two or more; one for a scaled or pruned copy)"
    )
    s.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="one weight per adapter (default: 1 each)"
    )
    s.add_argument("--how", choices=HOW, default="cat", help="the combination (default cat: the exact sum)")
    s.add_argument(
        "--density", type=float, help="ties, dare_*, magnitude_prune: the fraction of entries kept"
    )
    s.add_argument(
        "--rank",
        help="the stored rank of a result that is not exactly low-rank (svd and the pruning types; "
        "default: the largest input rank), or 'full' (exact)",
    )
    s.add_argument("--energy", type=float, help="svd: the smallest rank keeping this share of the energy")
    s.add_argument(
        "--majority-sign", choices=("total", "frequency"), default="total", help="TIES' sign election"
    )
    s.add_argument("--seed", type=int, default=0, help="DARE's random drops (default 0)")
    s.add_argument(
        "--missing",
        choices=("zero", "refuse"),
        help="where an adapter does not adapt a module: zero (it adds nothing there) or refuse "
        "(default: refuse when the adapters' targets differ)",
    )
    s.add_argument(
        "--keep-modules-of",
        type=int,
        metavar="I",
        help="keep the full module copies (a classifier head) of the I-th adapter (1-based)",
    )
    s.add_argument("--model", help="base model (default: the one the first adapter records)")
    s.add_argument("--task", help="task (default: the one the kept adapter records)")
    s.add_argument(
        "--no-strict-base",
        action="store_true",
        help="load adapters even if the base model's weights differ from the ones they were saved on",
    )
    add_quantize_flag(s)


def _rank(value: str | None) -> int | str | None:
    if value is None or value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--rank must be a positive integer or 'full', not {value!r}") from None


def run_combine(args: argparse.Namespace) -> int:
    """``deltatune combine``: see the module docstring."""
    folders = [Path(a) for a in args.adapters]
    weights = args.weights if args.weights is not None else [1.0] * len(folders)
    if len(weights) != len(folders):
        raise ValueError(f"--weights gives {len(weights)} weights for {len(folders)} adapters; give one each")
    keep = args.keep_modules_of
    if keep is not None and not 1 <= keep <= len(folders):
        raise ValueError(f"--keep-modules-of must be between 1 and {len(folders)}, not {keep}")
    out = check_out(args.out, overwrite=args.overwrite, what="deltatune combine")
    first = (keep or 1) - 1
    kept = folders[first]
    run = _run_options(kept, args.model, args.task, need_task=False)
    strict = not args.no_strict_base
    # The base with the kept adapter (its head included) loaded as "default", then the others: with
    # --keep-modules-of without their heads (module copies; they may be of other tasks), without it
    # with them (and combine refuses them).
    model, _, _, _ = _load_adapted(kept, run, strict_base=strict, quantize=args.quantize)
    model.eval()
    names = ["default" if i == first else f"adapter{i + 1}" for i in range(len(folders))]
    for i, (name, folder) in enumerate(zip(names, folders, strict=True)):
        if i != first:
            load(model, folder, name=name, activate=False, strict_base=strict, module_copies=keep is None)
    combine(
        model,
        dict(zip(names, weights, strict=True)),
        "combined",
        how=args.how,
        density=args.density,
        rank=_rank(args.rank),  # type: ignore[arg-type]
        energy=args.energy,
        majority_sign=args.majority_sign,
        seed=args.seed,
        missing=args.missing,
        keep_modules_of=names[keep - 1] if keep is not None else None,
    )
    harness = recorded(read_config(kept), str(kept / CONFIG_NAME))
    harness_save(model, out, "combined", head=harness["head"], task=harness["task"], base_model=run.model)
    sources = ", ".join(f"{w:g} x {f}" for w, f in zip(weights, folders, strict=True))
    print(f"wrote the {args.how} combination of {sources} to {out.resolve()}")
    return 0
