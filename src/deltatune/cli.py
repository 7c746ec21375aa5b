"""The ``deltatune`` command line.

    deltatune methods [--json]                     registered methods: fields, defaults, capabilities
    deltatune train --model minilm --task sst2 --method lora --rank 8 --alpha 16 [--config run.yaml]
    deltatune eval ADAPTER [--model ...] [--task ...]
    deltatune merge ADAPTER --out DIR [--model ...] [--task ...]
    deltatune info ADAPTER [--json]

Method fields are flags of ``train`` once ``--method`` is known (``deltatune train --method lora
--help`` lists them). ``--config`` reads a YAML or JSON file of the same options; flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .core import CAPABILITIES, REGISTRY
from .fields import (
    Bool,
    Float,
    Instance,
    Int,
    OneOf,
    Text,
    field_table,
    from_jsonable,
    to_jsonable,
)

# The training harness's methods that are not registered adapters (deltatune.train.loop).
HARNESS_METHODS: dict[str, str] = {
    "full": "Full fine-tuning: every parameter of the model trains (a baseline; saves trained.safetensors).",
    "head": "Head only: the task head trains, the rest is frozen (a linear probe; a baseline).",
}


def methods_table() -> list[dict[str, Any]]:
    """Every method ``deltatune train`` takes, as plain data (name, class, docstring summary,
    capabilities, fields): the registered ones, then the harness's ``full`` and ``head`` (class None,
    no fields, ``"harness_only": true``). An initialiser field also lists the ``choices`` that fit it."""
    rows = []
    for name, cls in sorted(REGISTRY.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append(
            {
                "name": name,
                "class": cls.__name__,
                "summary": doc[0] if doc else "",
                "capabilities": {c: _jsonable(getattr(cls, c)) for c in CAPABILITIES},
                "fields": field_table(cls),
                "harness_only": False,
            }
        )
    for name, summary in HARNESS_METHODS.items():
        rows.append(
            {
                "name": name,
                "class": None,
                "summary": summary,
                "capabilities": {},
                "fields": [],
                "harness_only": True,
            }
        )
    return rows


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _print_methods(as_json: bool) -> None:
    rows = methods_table()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        if row["harness_only"]:
            print(f"{row['name']}  (deltatune train only): {row['summary']}")
            print("  fields: none\n")
            continue
        print(f"{row['name']}  ({row['class']}): {row['summary']}")
        caps = row["capabilities"]
        flags = [c for c, v in caps.items() if v is True]
        print(f"  capabilities: {', '.join(flags) or '-'}; layer types: {', '.join(caps['layer_types'])}")
        print("  fields:")
        width = max(len(f["name"]) for f in row["fields"])
        for f in row["fields"]:
            default = json.dumps(f["default"])
            print(f"    {f['name']:<{width}}  default {default:<22} {f['constraint']:<28} {f['help']}")
            if "choices" in f:
                choices = ", ".join(f["choices"])
                print(f"    {'':<{width}}  initialisers: {choices} (by name, or as JSON with fields)")
        print()


# -- train -------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _component(check: Instance, where: str) -> Any:
    """A flag type for an initialiser field: a name (``pissa``) or JSON (``'{"type": "pissa", ...}'``),
    refused unless it is one of the initialisers that fit the field."""

    def initialiser(value: str) -> Any:
        try:
            data = json.loads(value) if value.lstrip().startswith("{") else {"type": value}
            return from_jsonable(data, where, check)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return initialiser


def _field_flag(cls: type, f: dataclasses.Field[Any]) -> dict[str, Any] | None:
    """``add_argument`` keywords for a method field; None if the command line cannot set it (--config)."""
    check = f.metadata.get("check")
    default = f.default if isinstance(f.default, str) else json.dumps(to_jsonable(f.default))
    text = f.metadata.get("help", "")
    kw: dict[str, Any] = {"dest": f"field__{f.name}", "default": None, "metavar": f.name.upper()}
    if isinstance(check, (Int, Float)):
        kw.update(type=int if isinstance(check, Int) else float, help=f"{text}; {check.describe()}")
    elif isinstance(check, Bool):
        kw.update(type=_bool, metavar="{true,false}", help=text)
    elif isinstance(check, OneOf):
        kinds = {type(o) for o in check.options}
        kw.update(
            type=kinds.pop() if len(kinds) == 1 else str,
            choices=check.options,
            metavar="{" + ",".join(str(o) for o in check.options) + "}",
            help=text,
        )
    elif isinstance(check, Text):
        kw.update(type=str, help=text)
    elif isinstance(check, Instance):
        names = check.component_names()
        kw.update(
            type=_component(check, f"{cls.__name__}.{f.name}"),
            help=f"{text}: one of {', '.join(names)}; a name, or JSON with its fields "
            """('{"type": NAME, "FIELD": VALUE}')""",
        )
    else:
        return None
    kw["help"] += f" (default {default})"
    return kw


# Help for every training option; {names} are filled in (a test checks that every flag has help).
TRAIN_HELP: dict[str, str] = {
    "model": "base model: an alias ({aliases}), a local folder in Hugging Face format, or a hub name",
    "task": "the task and its data: one of {tasks}",
    "method": "a registered method ({methods}), full (every parameter trains) or head (only the task "
    "head trains); `deltatune methods` lists them, `--method NAME --help` adds the method's fields here",
    "targets": "modules to adapt, by name, dotted suffix or regex, or all-linear (default: the method's "
    "own, else the attention query and value projections)",
    "modules_to_save": "modules trained in full and saved with the adapter (default: the task head)",
    "steps": "optimizer steps",
    "batch_size": "examples per micro-batch (split across the processes under torchrun)",
    "grad_accum": "micro-batches per optimizer step: the global batch is BATCH_SIZE x GRAD_ACCUM",
    "lr": "peak learning rate",
    "head_lr": "learning rate of the task head (default: LR)",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of the steps with a linear warmup, in [0, 1)",
    "schedule": "learning rate after the warmup: one of {schedules}",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "max_length": "truncate inputs to this many tokens",
    "train_limit": "train on a seeded sample of this many examples (default: all)",
    "eval_limit": "evaluate on a seeded sample of this many examples (default: all)",
    "eval_every": "also evaluate every N steps (0: only at the end)",
    "eval_before": "also evaluate before training",
    "eval_batch_size": "examples per evaluation batch",
    "max_new_tokens": "generation tasks: tokens generated per example",
    "checkpoint_every": "write a resumable checkpoint every N steps (0: never)",
    "seed": "seeds the data order and the head and adapter initialisation",
    "precision": "one of {precisions}: float32, or bfloat16 autocast",
    "out": "folder for adapter/, metrics.json, curves.png and checkpoint/ (default: runs/TASK-METHOD); "
    "one holding a run of another config is refused unless --overwrite",
    "data_dir": "folder of the data sets (default: $DELTATUNE_DATA, else ../shared/datasets)",
    "resume": "continue from the checkpoint in --out (a run of the same config)",
}
_NO_DEFAULT_SHOWN = ("out", "head_lr", "train_limit", "eval_limit", "data_dir")  # their help says it


def _train_parser(method: str | None) -> argparse.ArgumentParser:
    from .train.data import TASKS
    from .train.loop import FULL, HEAD_ONLY, PRECISIONS, SCHEDULES, TrainConfig
    from .train.models import ALIASES

    p = argparse.ArgumentParser(
        prog="deltatune train",
        usage="%(prog)s [--method METHOD] [--model MODEL] [--task TASK] [--config FILE] [options] "
        "[method fields]",
        description="Fine-tune a model on a task. A method's fields become flags once --method is "
        "given (deltatune train --method lora --help).",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of these options (flags override it)")
    closed: dict[str, tuple[str, ...]] = {
        "task": tuple(sorted(TASKS)),
        "method": (*sorted(REGISTRY), FULL, HEAD_ONLY),
        "schedule": SCHEDULES,
        "precision": PRECISIONS,
    }
    names = {
        "aliases": ", ".join(ALIASES),
        "tasks": ", ".join(closed["task"]),
        "methods": ", ".join(sorted(REGISTRY)),
        "schedules": ", ".join(SCHEDULES),
        "precisions": ", ".join(PRECISIONS),
    }
    defaults = TrainConfig()
    types: dict[str, Any] = {"head_lr": float, "train_limit": int, "eval_limit": int, "data_dir": str}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "method_fields":
            continue  # the method's own flags, below
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = TRAIN_HELP.get(f.name, "").format(**names)
        if f.name in ("targets", "modules_to_save"):
            p.add_argument(flag, nargs="+", default=None, metavar="MODULE", help=text)
            continue
        if f.name not in _NO_DEFAULT_SHOWN:
            text += f" (default {json.dumps(default) if isinstance(default, bool) else default})"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "metavar": f.name.upper(), "help": text}
        if isinstance(default, bool):
            kw.update(type=_bool, metavar="{true,false}")
        elif f.name in closed:
            kw.update(choices=closed[f.name])
        else:
            kw.update(type=types.get(f.name, type(default)))
        p.add_argument(flag, **kw)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run of another config in --out (deletes its adapter, metrics and checkpoint)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (else a bar on a terminal, a plain line every few seconds in a log)",
    )
    if method in REGISTRY:
        cls = REGISTRY[method]
        group = p.add_argument_group(f"{method} fields ({cls.__name__}; see deltatune methods)")
        for f in dataclasses.fields(cls):
            field_kw = _field_flag(cls, f)
            if field_kw is not None:
                group.add_argument("--" + f.name.replace("_", "-"), **field_kw)
    return p


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option -> value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _train(argv: list[str]) -> int:
    from .train.loop import TrainConfig, train

    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--method")
    probe.add_argument("--config")
    known, _ = probe.parse_known_args(argv)
    options: dict[str, Any] = _read_config_file(known.config) if known.config else {}
    method = known.method or options.get("method", TrainConfig.method)
    args = _train_parser(method).parse_args(argv)
    for key, value in vars(args).items():
        if value is None or key in ("config", "no_progress", "overwrite"):
            continue
        if key.startswith("field__"):
            options.setdefault("method_fields", {})[key[len("field__") :]] = value
        else:
            options[key] = value
    if "out" not in options:
        options["out"] = f"runs/{options.get('task', TrainConfig.task)}-{method}"
    cfg = TrainConfig.from_dict(options)
    record = train(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    if record:
        _print_record(record)
    return 0


def _print_record(record: dict[str, Any]) -> None:
    main = record["main_metric"]
    m = record["metrics"]
    print(
        f"{record['config']['method']} on {record['task']}: {main} {m[main]:.2f}  "
        + "  ".join(f"{k} {v:.4g}" for k, v in m.items() if k != main)
    )
    print(
        f"trainable {record['trainable_parameters']:,} of {record['total_parameters']:,} parameters; "
        f"stored {record['stored_bytes']:,} bytes; train {record['train_seconds']:.1f} s; "
        f"peak memory {record['peak_memory_bytes'] / 2**20:.0f} MiB"
    )
    print(f"wrote {record['config']['out']}/metrics.json, curves.png and the adapter")


# -- eval / merge / info -----------------------------------------------------------------------


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
    ``task``, ``head``: deltatune.save and the harness write them), else from the ``metrics.json`` a
    harness run writes beside its adapter folder. The evaluation options (max_length, eval_limit, ...)
    come from whichever record is of the chosen task.
    """
    from .io import CONFIG_NAME, read_config

    config = read_config(adapter)
    recorded: dict[str, Any] = config.get("task") or {}
    run: dict[str, Any] = {}
    metrics = adapter.parent / "metrics.json"
    if metrics.is_file():
        try:
            run = json.loads(metrics.read_text()).get("config", {})
        except (json.JSONDecodeError, AttributeError):
            run = {}
    model = model or config.get("base_model") or run.get("model")
    task = task or recorded.get("name") or run.get("task")
    nothing_else = f"its {CONFIG_NAME} records none and there is no metrics.json of a deltatune run beside it"
    if not model:
        raise ValueError(
            f"{adapter}: pass --model (an alias such as minilm, a local model folder or a hub name): "
            f"{nothing_else}"
        )
    head = config.get("head")
    if not task and (need_task or head is None):
        from .train.data import TASKS

        what = "" if need_task else " (or re-save the adapter with deltatune.save(..., head=...))"
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


def _load_adapted(adapter: Path, run: _Run) -> tuple[Any, Any, Any]:
    """The base model (with the head the task or the adapter calls for) with the adapter loaded."""
    from .io import load
    from .train.data import get_task
    from .train.models import load_model

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
    else:
        assert run.head is not None  # _run_options asks for --task otherwise
        kind, labels = run.head["kind"], run.head.get("num_labels")
    model, tokenizer = load_model(run.model, kind, labels if kind == "classification" else None)
    load(model, adapter)
    return model, tokenizer, task


def _eval(args: argparse.Namespace) -> int:
    from .train.data import load_split
    from .train.loop import TrainConfig, evaluate

    adapter = Path(args.adapter)
    run = _run_options(adapter, args.model, args.task, need_task=True)
    model, tokenizer, task = _load_adapted(adapter, run)
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
    print(
        json.dumps(
            {"adapter": str(adapter), "task": task.name, "examples": len(examples), **metrics}, indent=2
        )
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .core import merge
    from .io import write_folder

    adapter = Path(args.adapter)
    run = _run_options(adapter, args.model, args.task, need_task=False)
    model, tokenizer, _ = _load_adapted(adapter, run)
    merge(model)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    # Through a temporary folder: a failed save leaves no half model, and the files get the usual
    # permissions (safetensors >= 0.8 writes model.safetensors 0o600 otherwise).
    out = write_folder(args.out, write)
    print(f"wrote the merged model to {out} (no deltatune needed to load it)")
    return 0


def adapter_info(folder: str | Path) -> dict[str, Any]:
    """What an adapter folder holds, without loading a model."""
    from .core import method_from_config
    from .io import WEIGHTS_NAME, read_config, read_tensors

    folder = Path(folder)
    config = read_config(folder)
    method = method_from_config(config["method"], config["config"])
    tensors = read_tensors(folder / WEIGHTS_NAME)
    stored = sum(t.numel() for t in tensors.values())
    stored_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    trainable = _trainable_from_fingerprint(config, method, tensors)
    return {
        "folder": str(folder),
        "method": config["method"],
        "config": config["config"],
        "capabilities": {c: _jsonable(getattr(type(method), c)) for c in CAPABILITIES},
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
        "head": config.get("head"),
        "task": config.get("task"),
    }


def _stand_in(kind: str, shape: list[int]) -> Any:
    """A weightless (meta-device) module with the class and weight shape a fingerprint records."""
    from torch import nn

    if kind == "Linear" and len(shape) == 2:
        return nn.Linear(shape[1], shape[0], device="meta")
    if kind == "Embedding" and len(shape) == 2:
        return nn.Embedding(shape[0], shape[1], device="meta")
    if kind == "Conv1D" and len(shape) == 2:
        return _conv1d(shape)
    return None


def _conv1d(shape: list[int]) -> Any:
    import torch
    from torch import nn

    class Conv1D(nn.Module):  # the name and the (in, out) weight are what module_kind() reads
        def __init__(self) -> None:
            super().__init__()
            self.nf = shape[1]
            self.weight = nn.Parameter(torch.empty(shape, device="meta"))

    return Conv1D()


def _trainable_from_fingerprint(config: dict[str, Any], method: Any, tensors: dict[str, Any]) -> int | None:
    """The trainable count from the methods' closed forms and the recorded module shapes."""
    from .core import config_for

    fingerprint = config["fingerprint"]
    overrides = config.get("overrides") or {}
    bases: dict[str, Any] = {}
    for path in config["targets"]:
        kind, shape = fingerprint.get(path, [None, []])
        base = _stand_in(str(kind), list(shape))
        if base is None:
            return None
        bases[path] = base
    total = sum(config_for(method, p, overrides).parameter_count(b) for p, b in bases.items())
    shared_count = getattr(method, "shared_parameter_count", None)
    if shared_count is not None:
        total += shared_count(bases)
    for path in config.get("modules_to_save") or []:
        total += sum(t.numel() for k, t in tensors.items() if k.startswith(f"{path}.module."))
    return int(total)


def _info(args: argparse.Namespace) -> int:
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
    targets = info["targets"]
    shown = ", ".join(targets[:6]) + (f", ... ({len(targets)} in all)" if len(targets) > 6 else "")
    print(f"  targets: {shown}")
    if info["modules_to_save"]:
        print(f"  modules trained in full: {', '.join(info['modules_to_save'])}")
    if info["trainable_parameters"] is not None:
        print(f"  trainable parameters: {info['trainable_parameters']:,}")
    print(
        f"  stored: {info['stored_parameters']:,} values, {info['stored_bytes']:,} bytes "
        f"({'/'.join(info['dtypes'])}; {info['float32_equivalent_parameters']:,} float32-equivalent); "
        f"files {info['file_bytes']:,} bytes on disk"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list the registered methods, their fields and capabilities")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("train", help="fine-tune a model on a task (deltatune train --help)", add_help=False)
    for name, helptext in (("eval", "evaluate a saved adapter"), ("merge", "write a merged model")):
        s = sub.add_parser(name, help=helptext)
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
        if name == "eval":
            s.add_argument("--limit", type=int, help="evaluate on this many examples")
            s.add_argument("--data-dir")
            s.add_argument("--no-progress", action="store_true")
        else:
            s.add_argument("--out", required=True, help="folder for the merged model")
    i = sub.add_parser("info", help="what an adapter stores")
    i.add_argument("adapter")
    i.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        try:
            return _train(argv[1:])
        except ValueError as e:
            print(f"deltatune train: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        if args.command == "methods":
            _print_methods(args.json)
            return 0
        if args.command == "eval":
            return _eval(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "info":
            return _info(args)
    except ValueError as e:
        print(f"deltatune {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
