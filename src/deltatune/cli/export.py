"""``deltatune export``: a trained adapter, written for the runtime that will serve it.

* ``--to peft-lora``: PEFT's plain LoRA, for PEFT, vLLM and SGLang (``--for vllm``: only what vLLM
  loads), from any low-rank method (:mod:`deltatune.formats.lora`);
* ``--to gguf``: llama.cpp's LoRA adapter file, with the base model as GGUF beside it
  (:mod:`deltatune.formats.gguf`);
* ``--to gguf-merged``: one GGUF file of the model with the adapter merged in;
* ``--to merged``: a merged Hugging Face model folder (as ``deltatune merge`` writes).

Each target refuses, naming the reason and the alternative, what it cannot hold; ``--out`` must be
new or empty unless ``--overwrite`` (then it is replaced whole), and is written all at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..formats.files import check_out, write_folder
from ..formats.gguf import GGUF_TYPES, export_gguf_lora, export_gguf_model
from ..formats.lora import LoraExport, export_lora
from ..runtime.core import merge
from .adapter import add_loading_flags, documented_parser, load_for_command, write_merged

__all__ = ["TARGETS", "add_parser", "run_export"]

#: ``--to`` values and what each writes.
TARGETS = {
    "peft-lora": "PEFT's plain LoRA folder (PEFT, vLLM, SGLang); any low-rank method",
    "gguf": "llama.cpp: adapter.gguf (the LoRA) and the base model as GGUF",
    "gguf-merged": "llama.cpp: one GGUF of the model with the adapter merged in",
    "merged": "a merged Hugging Face model folder (transformers, vLLM, TGI)",
}
_TASK_TYPES = {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "generation": "CAUSAL_LM"}


def add_parser(sub: Any) -> None:
    """Add ``export`` to the ``deltatune`` command's subparsers."""
    helptext = "write a trained adapter for another runtime: PEFT/vLLM LoRA, llama.cpp GGUF, a merged model"
    s = documented_parser(sub, "export", helptext, __doc__)
    add_loading_flags(s)
    s.add_argument(
        "--to",
        required=True,
        choices=sorted(TARGETS),
        help="; ".join(f"{k}: {v}" for k, v in TARGETS.items()),
    )
    s.add_argument(
        "--for",
        dest="runtime",
        choices=("peft", "vllm"),
        default="peft",
        help="--to peft-lora: peft (ranks and alphas per module, modules_to_save) or vllm (one rank, "
        "one scale, linear layers only, no modules_to_save; refused with the reason otherwise)",
    )
    s.add_argument(
        "--max-rank",
        type=int,
        metavar="N",
        help="--to peft-lora: refuse a rank above N (vLLM's --max-lora-rank)",
    )
    s.add_argument(
        "--approximate-rank",
        type=int,
        metavar="R",
        help="--to peft-lora/gguf: write an update that is not low-rank (DoRA, ...) as its best rank-R "
        "LoRA (a truncated SVD), printing each module's relative error (default: refuse it)",
    )
    s.add_argument(
        "--gguf-type",
        choices=GGUF_TYPES,
        default="f16",
        help="--to gguf/gguf-merged: the model file's matrices (norms stay f32; the LoRA is f32)",
    )
    s.add_argument(
        "--gguf-base",
        metavar="FILE",
        help="--to gguf/gguf-merged: a GGUF of the base model (any type), whose tokenizer, chat template "
        "and names are copied (default: the smollm2 alias's own file; else required for gguf-merged)",
    )


def _check_flags(args: argparse.Namespace) -> None:
    lora_only = {"--for": args.runtime != "peft", "--max-rank": args.max_rank is not None}
    for flag, given in lora_only.items():
        if given and args.to != "peft-lora":
            raise ValueError(f"{flag} applies to --to peft-lora, not --to {args.to}")
    if args.approximate_rank is not None and args.to not in ("peft-lora", "gguf"):
        raise ValueError(f"--approximate-rank applies to --to peft-lora or gguf; --to {args.to} is exact")
    gguf_given = args.gguf_base is not None or args.gguf_type != "f16"
    if gguf_given and not args.to.startswith("gguf"):
        raise ValueError(f"--gguf-base and --gguf-type apply to --to gguf or gguf-merged, not --to {args.to}")
    if args.gguf_base is not None and not Path(args.gguf_base).is_file():
        raise ValueError(f"--gguf-base {args.gguf_base}: no such file")


def _template(args: argparse.Namespace, model_name: str) -> Path | None:
    if args.gguf_base is not None:
        return Path(args.gguf_base)
    if model_name == "smollm2":
        from ..train.smollm2 import find_smollm2_gguf

        return find_smollm2_gguf()
    return None


def _lora_summary(report: LoraExport, what: str, where: Path) -> str:
    ranks = sorted(set(report.ranks.values()))
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    line = f"wrote {what} (rank {rank} on {len(report.ranks)} modules) to {where}"
    if report.max_error > 0:
        worst = max(report.errors, key=lambda p: report.errors[p])
        line += (
            f"; an approximation: relative error per module {min(report.errors.values()):.3g} to "
            f"{report.max_error:.3g} (at {worst})"
        )
    return line


def run_export(args: argparse.Namespace) -> int:
    """``deltatune export``: see the module docstring."""
    _check_flags(args)
    out = check_out(args.out, overwrite=args.overwrite, what="deltatune export")
    model, tokenizer, run, four = load_for_command(args)
    if args.to == "merged":
        note = write_merged(model, tokenizer, out, four)
        print(f"wrote the merged model to {out} (no deltatune needed to load it){note}")
        return 0
    if args.to == "peft-lora":
        kind = (run.head or {}).get("kind") or ("generation" if run.task is None else None)
        report = export_lora(
            model,
            out,
            runtime=args.runtime,
            max_rank=args.max_rank,
            approximate_rank=args.approximate_rank,
            base_model_name_or_path=run.model,
            task_type=_TASK_TYPES.get(kind or ""),
        )
        for path, error in report.errors.items():
            if error > 0:
                print(f"  {path}: rank {report.ranks[path]}, relative error {error:.4g}")
        how = "vllm serve BASE --enable-lora --lora-modules NAME=" if args.runtime == "vllm" else ""
        print(_lora_summary(report, f"a plain LoRA for {args.runtime}", report.folder))
        print(f"load it with peft.PeftModel.from_pretrained(base, '{out}')" if not how else f"{how}{out}")
        return 0
    template = _template(args, run.model)
    if args.to == "gguf-merged" and template is None:
        raise ValueError(
            "--to gguf-merged needs --gguf-base FILE: a GGUF of the base model (any type), whose "
            "tokenizer and chat template llama.cpp reads"
        )
    gguf_type = args.gguf_type
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        if args.to == "gguf":
            written["lora"] = export_gguf_lora(
                model, tmp / "adapter.gguf", approximate_rank=args.approximate_rank
            )
        if args.to == "gguf-merged" or template is not None:
            plain = _plain(model, merged=args.to == "gguf-merged")
            name = "model" if args.to == "gguf-merged" else "base"
            export_gguf_model(plain, tmp / f"{name}-{gguf_type}.gguf", template=template, dtype=gguf_type)

    write_folder(out, write, keep_others=False)
    if args.to == "gguf-merged":
        print(f"wrote {out / f'model-{gguf_type}.gguf'}: llama-cli -m {out / f'model-{gguf_type}.gguf'}")
        return 0
    print(_lora_summary(written["lora"], "llama.cpp's LoRA", out.resolve() / "adapter.gguf"))
    if template is None:
        print(
            "no base GGUF written (pass --gguf-base FILE, a GGUF of the base, to write one beside it); "
            f"run: llama-cli -m BASE.gguf --lora {out / 'adapter.gguf'}"
        )
    else:
        print(f"run: llama-cli -m {out / f'base-{gguf_type}.gguf'} --lora {out / 'adapter.gguf'}")
    return 0


def _plain(model: Any, *, merged: bool) -> Any:
    """The model with its adapter merged (``merged``) or removed, and a 4-bit base dequantised."""
    from ..runtime.core import unload
    from ..runtime.quantized_base import dequantize
    from ..runtime.wrapper import has_adapters

    if has_adapters(model):
        if merged:
            merge(model, dequantize=True)
        else:
            unload(model)
    dequantize(model)
    return model.to("cpu")
