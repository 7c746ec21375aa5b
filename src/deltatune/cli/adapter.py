"""The commands on a saved adapter: ``deltatune eval``, ``merge`` and ``info`` (see :mod:`deltatune.cli`).

``info`` reads the adapter's files alone (:func:`adapter_info`); ``eval`` and ``merge`` rebuild the
base model with the head the adapter was trained with, from what the adapter records (base model,
task, head) or, failing that, from the ``metrics.json`` of the harness run beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contract import CAPABILITIES, closed_form, method_from_config
from ..contract.fields import to_jsonable
from ..formats.files import check_out
from ..formats.hf import export_merged
from ..formats.io import CONFIG_NAME, WEIGHTS_NAME, load, read_adapter, read_config
from ..runtime.checks import few
from ..runtime.quant import FORMATS
from ..runtime.quantized_base import RECORD_KEY
from ..train.provenance import recorded as harness_record

__all__ = [
    "adapter_info",
    "add_loading_flags",
    "add_parsers",
    "load_for_command",
    "metrics_line",
    "run_eval",
    "run_info",
    "run_merge",
    "write_merged",
]


def documented_parser(sub: Any, name: str, helptext: str, doc: str | None) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows its module's docstring, with ``--out`` and
    ``--overwrite`` (every command that writes a folder: new or empty, else replaced whole)."""
    s: argparse.ArgumentParser = sub.add_parser(
        name, help=helptext, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    s.add_argument("--out", required=True, help="the folder to write (new or empty, else --overwrite)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out whole")
    return s


def add_loading_flags(s: argparse.ArgumentParser) -> None:
    """The adapter folder and how to load it: the flags of every command that loads a saved adapter
    onto its base (``eval``, ``merge``, ``export``)."""
    s.add_argument("adapter", help="adapter folder (adapter_config.json + adapter.safetensors)")
    s.add_argument(
        "--model",
        help="base model: an alias, a local folder or a hub name (default: the one the adapter "
        "records, else the run's metrics.json beside it)",
    )
    s.add_argument(
        "--task",
        help="task, e.g. sst2 (default: the one the adapter records, else the run's metrics.json)",
    )
    s.add_argument(
        "--no-strict-base",
        action="store_true",
        help="load the adapter even if the base model's weights differ from the ones it was saved on",
    )
    add_quantize_flag(s)


def add_parsers(sub: Any) -> None:
    """Add ``eval``, ``merge`` and ``info`` to the ``deltatune`` command's subparsers."""
    for name, helptext in (("eval", "evaluate a saved adapter"), ("merge", "write a merged model")):
        s = sub.add_parser(name, help=helptext)
        add_loading_flags(s)
        if name == "eval":
            s.add_argument(
                "--limit",
                type=int,
                metavar="N",
                help="evaluate on a seeded sample of N examples of the task's evaluation split (the same "
                "N examples every time; default: the examples the run was evaluated on, else all)",
            )
            s.add_argument(
                "--data-dir",
                metavar="DIR",
                help="folder of the data sets (default: the run's, else $DELTATUNE_DATA, else "
                "../shared/datasets)",
            )
            s.add_argument(
                "--no-progress",
                action="store_true",
                help="no progress output (else a bar on a terminal, a plain line every few seconds in a log)",
            )
            s.add_argument(
                "--json",
                action="store_true",
                help="print the metrics as JSON (for scripts) instead of a line",
            )
        else:
            s.add_argument("--out", required=True, help="folder for the merged model (new or empty)")
            s.add_argument("--overwrite", action="store_true", help="replace an existing --out whole")
    i = sub.add_parser("info", help="what an adapter stores")
    i.add_argument("adapter", help="adapter folder (adapter_config.json + adapter.safetensors)")
    i.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of text")


def add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    """``--quantize {nf4,none}``: the base's precision for the commands that load adapters."""
    parser.add_argument(
        "--quantize",
        choices=(*FORMATS, "none"),
        help="nf4: the base's linear layers in 4 bits (NormalFloat); none: the base in its own "
        "precision (default: as the adapter was trained, 4-bit where it records a 4-bit base)",
    )


def add_recorded_tokens(model: nn.Module, tokenizer: Any, folders: dict[str, Path]) -> None:
    """Add to ``tokenizer`` and ``model`` the special tokens the adapters' runs added
    (``--add-tokens``, recorded as ``task.added_tokens``), in the recorded order, before they load:
    the same ids, embeddings of the size they were trained on."""
    from ..train.models import add_tokens

    for folder in folders.values():
        task = harness_record(read_config(folder), str(folder / CONFIG_NAME))["task"] or {}
        if task.get("added_tokens"):
            add_tokens(model, tokenizer, list(task["added_tokens"]))


def load_adapters(
    model: nn.Module, folders: dict[str, Path], quantize: str | None, *, strict_base: bool, active: str
) -> bool:
    """Load each adapter of ``folders`` (name -> folder) onto ``model``, ``active`` activated, on the
    base precision ``quantize`` asks for; returns whether the base is 4-bit now.

    ``quantize`` None: 4-bit if an adapter records a 4-bit base (rebuilding it exactly: its recorded
    modules, block sizes, QPiSSA residual), else as the base loads. ``"nf4"``: 4-bit in any case
    (the linear layers no adapter records are quantised after loading). ``"none"``: in the base's own
    precision (a QLoRA adapter on the float weights; a QPiSSA adapter is refused: it needs its residual).
    """
    from ..runtime.quant import quantize as quantize_base
    from ..runtime.quantized_base import compact, float_linears

    recorded = {name: RECORD_KEY in read_config(folder) for name, folder in folders.items()}
    four = quantize in FORMATS or (quantize is None and any(recorded.values()))
    for name, folder in folders.items():
        wants = four if recorded[name] else None
        load(model, folder, name=name, activate=name == active, strict_base=strict_base, quantize=wants)
    if four:
        rest = list(float_linears(model))
        if rest:
            quantize_base(model, rest)
        compact(model)
    return four


@dataclasses.dataclass
class _Run:
    """What ``eval`` and ``merge`` need to rebuild an adapter's model (see :func:`_run_options`)."""

    model: str
    task: str | None
    head: dict[str, Any] | None
    options: dict[str, Any]  # max_length, max_new_tokens, eval_limit, eval_seed, data_dir


def _run_options(adapter: Path, model: str | None, task: str | None, *, need_task: bool) -> _Run:
    """Base model, task, head and evaluation options for an adapter.

    Each comes from the flag if given, else from what ``adapter_config.json`` records (``base_model``,
    deltatune.save writes it; ``head`` and ``task``: the harness's record, :mod:`deltatune.train.
    provenance`), else from the ``metrics.json`` a harness run writes beside its adapter folder. The
    evaluation options (max_length, eval_limit, ...) come from whichever record is of the chosen task.
    """
    config = read_config(adapter)
    harness = harness_record(config, str(adapter / CONFIG_NAME))
    recorded: dict[str, Any] = harness["task"] or {}
    run: dict[str, Any] = {}
    metrics = adapter.parent / "metrics.json"
    if metrics.is_file():
        try:
            run = json.loads(metrics.read_text()).get("config", {})
        except (json.JSONDecodeError, AttributeError):
            run = {}
    model = model or config.get("base_model") or run.get("model")
    if task is None and recorded.get("data") is not None and need_task:
        raise ValueError(
            f"{adapter}: trained on your own data ({recorded['data']}, {recorded.get('format')}); its "
            "held-out loss and answers are in the run's metrics.json and generations.jsonl. Try it with "
            "deltatune generate / deltatune chat, or pass --task to evaluate it on a built-in task"
        )
    # (a run on the user's data has no task: its metrics.json's task is the unused default)
    task = task or recorded.get("name") or (None if recorded.get("data") else run.get("task"))
    nothing_else = f"its {CONFIG_NAME} records none and there is no metrics.json of a deltatune run beside it"
    if not model:
        raise ValueError(
            f"{adapter}: pass --model (an alias such as minilm, a local model folder or a hub name): "
            f"{nothing_else}"
        )
    head = harness["head"]
    if not task and (need_task or head is None):
        from ..train.tasks import TASKS

        what = (
            ""
            if need_task
            else " (or re-save the adapter with deltatune.train.provenance.save(..., head=...))"
        )
        raise ValueError(f"{adapter}: pass --task, one of {', '.join(sorted(TASKS))}{what}: {nothing_else}")
    options: dict[str, Any] = {}
    if run and run.get("task") == task:
        options.update(
            max_length=run.get("max_length"),
            max_new_tokens=run.get("max_new_tokens"),
            eval_limit=run.get("eval_limit"),
            eval_seed=run.get("seed"),
            data_dir=run.get("data_dir"),
        )
    if recorded.get("name") == task:
        options.update({k: v for k, v in recorded.items() if k != "name"})
    return _Run(model, task, head, options)


def _load_adapted(
    adapter: Path, run: _Run, *, strict_base: bool = True, quantize: str | None = None
) -> tuple[Any, Any, Any, bool]:
    """The base model (with the head the task or the adapter calls for) with the adapter loaded, its
    tokenizer, the task, and whether the base is 4-bit (:func:`load_adapters`)."""
    from ..train.models import load_model
    from ..train.tasks import get_task

    task = get_task(run.task) if run.task else None
    if task is not None:
        kind, labels = task.kind, (task.num_labels or None if task.kind == "classification" else None)
        head = run.head
        if head is not None and (head["kind"], head.get("num_labels")) != (kind, labels):
            saved_on = head["kind"] + (f" with {head['num_labels']} labels" if head.get("num_labels") else "")
            wants = kind + (f" with {labels} labels" if labels else "")
            raise ValueError(
                f"{adapter}: task {task.name} needs a {wants} head, but the adapter was saved on a "
                f"{saved_on} head; pass the --task it was trained on"
            )
    elif run.head is not None:
        kind, labels = run.head["kind"], run.head.get("num_labels")
    else:  # _run_options refuses this case with the full message
        raise ValueError(f"{adapter}: pass --task")
    model, tokenizer = load_model(run.model, kind, labels if kind == "classification" else None)
    add_recorded_tokens(model, tokenizer, {"default": adapter})
    if torch.cuda.is_available():
        model.to("cuda")  # quantised there, if it is, and evaluated there
    four = load_adapters(model, {"default": adapter}, quantize, strict_base=strict_base, active="default")
    return model, tokenizer, task, four


def run_eval(args: argparse.Namespace) -> int:
    """``deltatune eval``: the task's metrics of the adapter on the examples its run was evaluated on
    (unless ``--limit``), as a line (:func:`metrics_line`) or as JSON (``--json``)."""
    from ..train.config import TrainConfig
    from ..train.evaluation import evaluate
    from ..train.tasks import load_split

    adapter = Path(args.adapter)
    run = _run_options(adapter, args.model, args.task, need_task=True)
    strict_base = not getattr(args, "no_strict_base", False)
    model, tokenizer, task, _ = _load_adapted(adapter, run, strict_base=strict_base, quantize=args.quantize)
    saved = run.options
    # By default, the examples the run itself was evaluated on, prepared the same way.
    limit = args.limit if args.limit is not None else saved.get("eval_limit")
    seed = saved.get("eval_seed")
    cfg = TrainConfig(
        model=run.model,
        task=task.name,
        max_length=int(saved.get("max_length") or 128),
        eval_limit=limit,
        max_new_tokens=int(saved.get("max_new_tokens") or 64),
    )
    data_dir = args.data_dir or saved.get("data_dir")
    examples = load_split(task, "eval", data_dir, limit=limit, seed=seed if limit else None)
    metrics = evaluate(model, tokenizer, task, examples, cfg, progress=not args.no_progress)
    if args.json:
        print(
            json.dumps(
                {"adapter": str(adapter), "task": task.name, "examples": len(examples), **metrics}, indent=2
            )
        )
    else:
        print(metrics_line(task.name, task.main_metric, metrics, len(examples), str(adapter)))
    return 0


#: Metrics in percent (the harness scores them 0-100); the others are printed as they are.
PERCENT = ("accuracy", "f1", "exact_match", "answer_accuracy")


def metrics_line(task: str, main: str, metrics: dict[str, float], examples: int, where: str) -> str:
    """``sst2: accuracy 82.80 % (f1 83.1 %, ...) on 872 examples of runs/x/adapter``: the main
    metric first, four significant figures at most, percentages marked."""

    def said(name: str) -> str:
        value = metrics[name]
        return f"{name} {value:.2f} %" if name in PERCENT else f"{name} {value:.4g}"

    others = [said(k) for k in metrics if k != main]
    first = said(main) if main in metrics else ""
    rest = f" ({', '.join(others)})" if others and first else ", ".join(others)
    return f"{task}: {first}{rest} on {examples:,} examples ({where})"


def load_for_command(args: argparse.Namespace) -> tuple[Any, Any, _Run, bool]:
    """The base model with the adapter of ``args`` (:func:`add_loading_flags`) loaded, its
    tokenizer, the run's options and whether the base is 4-bit; no task needed (a merge or an
    export writes the head the adapter was saved on)."""
    adapter = Path(args.adapter)
    run = _run_options(adapter, args.model, args.task, need_task=False)
    strict_base = not getattr(args, "no_strict_base", False)
    model, tokenizer, _, four = _load_adapted(adapter, run, strict_base=strict_base, quantize=args.quantize)
    return model.eval(), tokenizer, run, four


def write_merged(model: Any, tokenizer: Any, out: str | Path, four: bool) -> str:
    """Merge the adapter into ``model`` (in place) and write it and its tokenizer to ``out``
    (:func:`deltatune.formats.hf.export_merged`); returns the note on a 4-bit base (``four``)."""
    export_merged(model, out, tokenizer, in_place=True)
    return (
        "; the adapter merged into the 4-bit base it was trained on, dequantised (the other 4-bit "
        "linear layers dequantised too; --quantize none merges into the base's own weights)"
        if four
        else ""
    )


def run_merge(args: argparse.Namespace) -> int:
    """``deltatune merge``: the base model with the adapter merged in, written as a plain transformers
    model (and its tokenizer) to ``--out``."""
    out = check_out(args.out, overwrite=args.overwrite, what="deltatune merge")
    model, tokenizer, _, four = load_for_command(args)
    note = write_merged(model, tokenizer, out, four)
    print(f"wrote the merged model to {out.resolve()} (no deltatune needed to load it){note}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """``deltatune info``: :func:`adapter_info` as text, or as JSON with ``--json``."""
    info = adapter_info(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['folder']}: {info['method']} adapter (format {info['format_version']})")
    origin = [f"base model: {info['base_model'] or 'not recorded'}"]
    if info["head"]:
        labels = info["head"].get("num_labels")
        origin.append(f"head: {info['head']['kind']}" + (f", {labels} labels" if labels else ""))
    if info["task"]:
        origin.append(f"task: {info['task']['name']}")
    print("  " + "; ".join(origin))
    print("  fields: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in info["config"].items()))
    print(f"  targets: {few(info['targets'])}")
    if info["modules_to_save"]:
        print(f"  modules trained in full: {', '.join(info['modules_to_save'])}")
    four = info["quantized_base"]
    if four:
        residual = (
            f"; QPiSSA residual on {len(four['residual'])} of them, {four['iterations']} rounds"
            if four["residual"]
            else ""
        )
        print(
            f"  trained on a 4-bit base: {four['format']}, {len(four['modules'])} linear layers, blocks of "
            f"{four['block_size']}{residual} (eval, generate, chat and merge rebuild it)"
        )
    if info["trainable_parameters"] is not None:
        print(f"  trainable parameters: {info['trainable_parameters']:,}")
    print(
        f"  stored: {info['stored_parameters']:,} values, {info['stored_bytes']:,} bytes "
        f"({'/'.join(info['dtypes'])}; {info['float32_equivalent_parameters']:,} float32-equivalent); "
        f"files {info['file_bytes']:,} bytes on disk"
    )
    return 0


def adapter_info(folder: str | Path) -> dict[str, Any]:
    """What an adapter folder holds, without loading a model."""
    folder = Path(folder)
    config, tensors = read_adapter(folder)
    method = method_from_config(config["method"], config["config"])
    stored = sum(t.numel() for t in tensors.values())
    stored_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    trainable = _trainable_from_fingerprint(config, method, tensors)
    harness = harness_record(config, str(folder / CONFIG_NAME))
    return {
        "folder": str(folder),
        "method": config["method"],
        "config": config["config"],
        "capabilities": {c: to_jsonable(getattr(type(method), c)) for c in CAPABILITIES},
        "targets": config["targets"],
        "overrides": config.get("overrides", {}),
        "modules_to_save": config.get("modules_to_save", []),
        "trainable_parameters": trainable,
        "stored_parameters": stored,
        "stored_bytes": stored_bytes,
        "float32_equivalent_parameters": stored_bytes // 4,
        "file_bytes": (folder / WEIGHTS_NAME).stat().st_size
        + (folder / "adapter_config.json").stat().st_size,
        "dtypes": dtypes,
        "format_version": config["format_version"],
        "base_model": config.get("base_model"),
        "head": harness["head"],
        "task": harness["task"],
        "quantized_base": config.get(RECORD_KEY),
    }


def _trainable_from_fingerprint(
    config: dict[str, Any], method: Any, tensors: dict[str, torch.Tensor]
) -> int | None:
    """The trainable count from the methods' closed forms (:func:`deltatune.runtime.core.closed_form`), on
    weightless stand-ins of the modules the fingerprint records; None where a module kind has none."""
    fingerprint = config["fingerprint"]
    bases: dict[str, nn.Module] = {}
    for path in config["targets"]:
        kind, shape = (fingerprint.get(path) or [None, []])[:2]  # [class, shape, content hash]
        base = _stand_in(str(kind), list(shape))
        if base is None:
            return None
        bases[path] = base
    # A module trained in full is stored whole: its stand-in holds tensors of the stored shapes.
    saved = {path: _copy_stand_in(tensors, f"{path}.module.") for path in config.get("modules_to_save") or []}
    trainable, _ = closed_form(method, bases, config.get("overrides") or {}, saved)
    return trainable


def _stand_in(kind: str, shape: list[int]) -> nn.Module | None:
    """A weightless (meta-device) module with the class and weight shape a fingerprint records."""
    if kind == "Linear" and len(shape) == 2:
        return nn.Linear(shape[1], shape[0], device="meta")
    if kind == "Embedding" and len(shape) == 2:
        return nn.Embedding(shape[0], shape[1], device="meta")
    if kind == "Conv1D" and len(shape) == 2:
        return Conv1D(shape)
    return None


class Conv1D(nn.Module):
    """A weightless stand-in for transformers' GPT-2 ``Conv1D``: the class name and the (in, out)
    weight are what :func:`deltatune.targets.module_kind` reads."""

    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.nf = shape[1]
        self.weight = nn.Parameter(torch.empty(shape, device="meta"))


def _copy_stand_in(tensors: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """Weightless parameters of the shapes and dtypes of the stored tensors under ``prefix``."""
    return nn.ParameterList(
        nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), requires_grad=False)
        for k, t in tensors.items()
        if k.startswith(prefix)
    )
