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
from .core import _CAPABILITIES, REGISTRY
from .fields import Bool, Check, Float, Instance, Int, OneOf, Text, field_table, from_jsonable


def methods_table() -> list[dict[str, Any]]:
    """Every registered method as plain data (name, class, docstring summary, capabilities, fields)."""
    rows = []
    for name, cls in sorted(REGISTRY.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append(
            {
                "name": name,
                "class": cls.__name__,
                "summary": doc[0] if doc else "",
                "capabilities": {c: _jsonable(getattr(cls, c)) for c in _CAPABILITIES},
                "fields": field_table(cls),
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
        print(f"{row['name']}  ({row['class']}): {row['summary']}")
        caps = row["capabilities"]
        flags = [c for c, v in caps.items() if v is True]
        print(f"  capabilities: {', '.join(flags) or '-'}; layer types: {', '.join(caps['layer_types'])}")
        print("  fields:")
        width = max(len(f["name"]) for f in row["fields"])
        for f in row["fields"]:
            default = json.dumps(f["default"])
            print(f"    {f['name']:<{width}}  default {default:<22} {f['constraint']:<28} {f['help']}")
        print()


# -- train -------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _component(value: str) -> Any:
    """A config component (an initialiser) by name or as JSON: ``pissa``, ``'{"type": "pissa", ...}'``."""
    try:
        data = json.loads(value) if value.lstrip().startswith("{") else {"type": value}
        return from_jsonable(data, "the flag")
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _flag_type(check: Check | None) -> Any:
    if isinstance(check, Int):
        return int
    if isinstance(check, Float):
        return float
    if isinstance(check, Bool):
        return _bool
    if isinstance(check, OneOf):
        kinds = {type(o) for o in check.options}
        return kinds.pop() if len(kinds) == 1 else str
    if isinstance(check, Text):
        return str
    if isinstance(check, Instance):
        return _component
    return None  # not settable from the command line: use --config


def _train_parser(method: str | None) -> argparse.ArgumentParser:
    from .train.loop import TrainConfig

    p = argparse.ArgumentParser(prog="deltatune train", description="Fine-tune a model on a task.")
    p.add_argument("--config", help="YAML or JSON file with training options (flags override it)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("method_fields",):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name in ("targets", "modules_to_save"):
            p.add_argument(
                flag, nargs="+", default=None, help=f"module names (default: {default or 'automatic'})"
            )
        elif isinstance(default, bool):
            p.add_argument(
                flag, dest=f.name, type=_bool, default=None, help=f"true/false (default {default})"
            )
        elif f.name in ("head_lr", "train_limit", "eval_limit", "data_dir"):
            kind = str if f.name == "data_dir" else (float if f.name == "head_lr" else int)
            p.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default: {default})")
        else:
            p.add_argument(flag, dest=f.name, type=type(default), default=None, help=f"(default: {default})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if method in REGISTRY:
        group = p.add_argument_group(f"{method} fields")
        for f in dataclasses.fields(REGISTRY[method]):
            check = f.metadata.get("check")
            kind = _flag_type(check if isinstance(check, Check) else None)
            if kind is None:
                continue
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f"field__{f.name}",
                type=kind,
                default=None,
                help=f"{f.metadata.get('help', '')} (default {f.default!r})",
            )
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
        if value is None or key in ("config", "no_progress"):
            continue
        if key.startswith("field__"):
            options.setdefault("method_fields", {})[key[len("field__") :]] = value
        else:
            options[key] = value
    if "out" not in options:
        options["out"] = f"runs/{options.get('task', TrainConfig.task)}-{method}"
    cfg = TrainConfig.from_dict(options)
    record = train(cfg, progress=not args.no_progress)
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


def _run_options(adapter: Path, model: str | None, task: str | None) -> tuple[str, str, dict[str, Any]]:
    """Model and task for an adapter: from flags, else from the run's metrics.json next to it."""
    saved: dict[str, Any] = {}
    metrics = adapter.parent / "metrics.json"
    if metrics.is_file():
        saved = json.loads(metrics.read_text()).get("config", {})
    model = model or saved.get("model")
    task = task or saved.get("task")
    if not model or not task:
        raise ValueError(
            f"{adapter}: pass --model and --task (no metrics.json of a deltatune run next to it)"
        )
    return model, task, saved


def _load_adapted(adapter: Path, model_name: str, task_name: str) -> tuple[Any, Any, Any]:
    from .io import load
    from .train.data import get_task
    from .train.models import load_model

    task = get_task(task_name)
    model, tokenizer = load_model(model_name, task.kind, task.num_labels or None)
    load(model, adapter)
    return model, tokenizer, task


def _eval(args: argparse.Namespace) -> int:
    from .train.data import load_split
    from .train.loop import TrainConfig, evaluate

    adapter = Path(args.adapter)
    model_name, task_name, saved = _run_options(adapter, args.model, args.task)
    model, tokenizer, task = _load_adapted(adapter, model_name, task_name)
    # By default, the examples the run itself was evaluated on.
    limit = args.limit if args.limit is not None else saved.get("eval_limit")
    seed = int(saved.get("seed", 0))
    cfg = TrainConfig(
        model=model_name,
        task=task_name,
        max_length=int(saved.get("max_length", 128)),
        eval_limit=limit,
        max_new_tokens=int(saved.get("max_new_tokens", 64)),
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

    adapter = Path(args.adapter)
    model_name, task_name, _ = _run_options(adapter, args.model, args.task)
    model, tokenizer, _ = _load_adapted(adapter, model_name, task_name)
    merge(model)
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
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
        "capabilities": {c: _jsonable(getattr(type(method), c)) for c in _CAPABILITIES},
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
    from .core import _config_for

    fingerprint = config["fingerprint"]
    overrides = config.get("overrides") or {}
    bases: dict[str, Any] = {}
    for path in config["targets"]:
        kind, shape = fingerprint.get(path, [None, []])
        base = _stand_in(str(kind), list(shape))
        if base is None:
            return None
        bases[path] = base
    total = sum(_config_for(method, p, overrides).parameter_count(b) for p, b in bases.items())
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
        s.add_argument("--model", help="base model (default: from the run's metrics.json)")
        s.add_argument("--task", help="task (default: from the run's metrics.json)")
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
