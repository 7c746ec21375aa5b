"""The ``deltatune`` command line.

    deltatune methods [--json]                     registered methods: fields, defaults, capabilities
    deltatune train --model minilm --task sst2 --method lora --rank 8 --alpha 16 [--config run.yaml]
    deltatune eval ADAPTER [--model ...] [--task ...]
    deltatune merge ADAPTER --out DIR [--model ...] [--task ...]
    deltatune info ADAPTER [--json]
    deltatune train --model smollm2 --data chat.jsonl [--eval-data held.jsonl] ...   your own data
    deltatune generate RUN_OR_ADAPTER --prompt TEXT | --prompts FILE [--adapter NAME=PATH ...]
    deltatune chat RUN_OR_ADAPTER [--compare-base]

Method fields are flags of ``train`` once ``--method`` is known (``deltatune train --method lora
--help`` lists them). ``--config`` reads a YAML or JSON file of the same options; flags override it.
This module holds ``methods`` and ``train``; the commands on a saved adapter (``eval``, ``merge``,
``info``) are in :mod:`deltatune.cli.adapter`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..contract import CAPABILITIES, REGISTRY
from ..contract.fields import Bool, Float, Instance, Int, OneOf, Text, field_table, from_jsonable, to_jsonable
from ..train.config import HARNESS_LR
from .adapter import add_parsers as add_adapter_parsers
from .adapter import run_eval, run_info, run_merge
from .combine import add_parser as add_combine_parser
from .combine import run_combine
from .export import add_parser as add_export_parser
from .export import run_export
from .generate import add_parsers as add_generate_parsers
from .generate import run_chat, run_generate
from .hints import canonical_method
from .train_help import NO_DEFAULT_SHOWN, OPTION_TYPES, TRAIN_HELP

# The training harness's methods that are not registered adapters (deltatune.train.config).
HARNESS_METHODS: dict[str, str] = {
    "full": "Full fine-tuning: every parameter of the model trains (a baseline; saves trained.safetensors).",
    "head": "Head only: the task head trains, the rest is frozen (a linear probe; a baseline).",
}


#: What ``deltatune train --method`` takes.
TRAIN_METHODS = (*sorted(REGISTRY), *HARNESS_METHODS)


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
                "capabilities": {c: to_jsonable(getattr(cls, c)) for c in CAPABILITIES},
                "default_lr": cls().default_lr(),
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
                "default_lr": HARNESS_LR[name],
                "fields": [],
                "harness_only": True,
            }
        )
    return rows


def _print_methods(as_json: bool) -> None:
    rows = methods_table()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        if row["harness_only"]:
            print(f"{row['name']}  (deltatune train only): {row['summary']}")
            print(f"  default learning rate: {row['default_lr']:g}; fields: none\n")
            continue
        print(f"{row['name']}  ({row['class']}): {row['summary']}")
        caps = row["capabilities"]
        flags = [c for c, v in caps.items() if v is True]
        print(f"  capabilities: {', '.join(flags) or '-'}; layer types: {', '.join(caps['layer_types'])}")
        print(f"  default learning rate: {row['default_lr']:g} (with its default fields)")
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


def _train_parser(method: str | None) -> argparse.ArgumentParser:
    """``deltatune train``'s flags: one per :class:`~deltatune.train.config.TrainConfig` option, and
    ``method``'s fields where a method is named."""
    p = argparse.ArgumentParser(
        prog="deltatune train",
        usage="%(prog)s [--method METHOD] [--model MODEL] [--task TASK] [--config FILE] [options] "
        "[method fields]",
        description="Fine-tune a model on a task. A method's fields become flags once --method is "
        "given (deltatune train --method lora --help).",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of these options (flags override it)")
    _add_option_flags(p)
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
    add_method_flags(p, method)
    return p


def add_method_flags(p: argparse.ArgumentParser, method: str | None) -> None:
    """A flag per field of ``method`` where it names a registered method (``--rank``, ...)."""
    if method in REGISTRY:
        cls = REGISTRY[method]
        group = p.add_argument_group(f"{method} fields ({cls.__name__}; see deltatune methods)")
        for f in dataclasses.fields(cls):
            field_kw = _field_flag(cls, f)
            if field_kw is not None:
                group.add_argument("--" + f.name.replace("_", "-"), **field_kw)


def _closed_choices() -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """The options that take one of a list of values (option -> values), and the lists that
    :data:`TRAIN_HELP` names (``{tasks}``, ...) as text."""
    from ..train.config import ADAPTER_PRECISIONS, PRECISIONS, QUANTIZE, REPORTERS, SCHEDULES
    from ..train.formats import DATA_FORMATS, LOSS_ON
    from ..train.models import ALIASES
    from ..train.tasks import TASKS

    closed: dict[str, tuple[str, ...]] = {
        "task": tuple(sorted(TASKS)),
        "schedule": SCHEDULES,
        "precision": PRECISIONS,
        "adapter_precision": ADAPTER_PRECISIONS,
        "data_format": DATA_FORMATS,
        "loss_on": LOSS_ON,
        "quantize": QUANTIZE,
    }
    names = {
        "aliases": ", ".join(ALIASES),
        "tasks": ", ".join(closed["task"]),
        "methods": ", ".join(sorted(REGISTRY)),
        "schedules": ", ".join(SCHEDULES),
        "precisions": ", ".join(PRECISIONS),
        "data_formats": ", ".join(DATA_FORMATS),
        "reporters": " and/or ".join(REPORTERS),
    }
    return closed, names


def _add_option_flags(p: argparse.ArgumentParser) -> None:
    """A flag per training option (``--steps``, ...), with its help, type or choices and default."""
    from ..train.config import REPORTERS, TrainConfig

    closed, names = _closed_choices()
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "method_fields":
            continue  # the method's own flags, below
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = TRAIN_HELP.get(f.name, "").format(**names)
        if f.name in ("targets", "modules_to_save"):
            p.add_argument(flag, nargs="+", default=None, metavar="MODULE", help=text)
            continue
        if f.name in ("add_tokens", "trainable_tokens"):
            p.add_argument(flag, nargs="+", default=None, metavar="TOKEN", help=text)
            continue
        if f.name == "report_to":
            p.add_argument(flag, nargs="+", default=None, choices=REPORTERS, dest=f.name, help=text)
            continue
        if f.name not in NO_DEFAULT_SHOWN:
            text += f" (default {json.dumps(default) if isinstance(default, bool) else default})"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "metavar": f.name.upper(), "help": text}
        if isinstance(default, bool):
            kw.update(type=_bool, metavar="{true,false}")
        elif f.name in closed:
            kw.update(choices=closed[f.name])
        else:
            kw.update(type=OPTION_TYPES.get(f.name, type(default)))
        p.add_argument(flag, **kw)


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
    from ..train.config import TrainConfig
    from ..train.loop import train

    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--method")
    probe.add_argument("--config")
    known, _ = probe.parse_known_args(argv)
    options: dict[str, Any] = _read_config_file(known.config) if known.config else {}
    method = canonical_method(str(known.method or options.get("method", TrainConfig.method)), TRAIN_METHODS)
    args = _train_parser(method).parse_args(argv)
    args.method = method if (args.method or "method" in options) else None
    for key, value in vars(args).items():
        if value is None or key in ("config", "no_progress", "overwrite"):
            continue
        if key.startswith("field__"):
            options.setdefault("method_fields", {})[key[len("field__") :]] = value
        else:
            options[key] = value
    if "out" not in options:
        name = Path(options["data"]).stem if options.get("data") else options.get("task", TrainConfig.task)
        options["out"] = f"runs/{name}-{method}"
    cfg = TrainConfig.from_dict(options)
    record = train(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    if record:
        _print_record(record)
    return 0


def _print_record(record: dict[str, Any]) -> None:
    main = record["main_metric"]
    m = record["metrics"]
    data = record.get("data")
    if data:
        for split in ("train", "eval"):
            c = data.get(split)
            if c:
                print(
                    f"{split}: {c['examples']:,} examples ({c['truncated']} truncated, {c['skipped']} "
                    f"skipped at --max-length {record['config']['max_length']})"
                )
    padding = record["history"].get("padding")
    if padding:
        print(f"padding: {padding['waste']:.1%} of the {padding['processed']:,} token positions trained on")
    print(
        f"{record['config']['method']} on {record['task']}: {main} {m[main]:.4g}  "
        + "  ".join(f"{k} {v:.4g}" for k, v in m.items() if k != main)
    )
    print(
        f"trainable {record['trainable_parameters']:,} of {record['total_parameters']:,} parameters; "
        f"stored {record['stored_bytes']:,} bytes; train {record['train_seconds']:.1f} s; "
        f"peak memory {record['peak_memory_bytes'] / 2**20:.0f} MiB"
    )
    written = (
        "metrics.json, curves.png, generations.jsonl"
        if data and record["config"]["eval_generate"]
        else ("metrics.json, curves.png")
    )
    print(f"wrote {record['config']['out']}/{written} and the adapter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list the registered methods, their fields and capabilities")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("train", help="fine-tune a model on a task (deltatune train --help)", add_help=False)
    sub.add_parser(
        "estimate",
        help="memory and FLOPs of a training step, before running it (deltatune estimate --help)",
        add_help=False,
    )
    add_adapter_parsers(sub)
    add_export_parser(sub)
    add_combine_parser(sub)
    add_generate_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from ..train.divergence import DivergedError

        try:
            return _train(argv[1:])
        except ValueError as e:
            print(f"deltatune train: error: {e}", file=sys.stderr)
            return 1 if isinstance(e, DivergedError) else 2
    if argv[:1] == ["estimate"]:
        from .estimate import run_estimate

        try:
            return run_estimate(argv[1:], add_method_flags)
        except ValueError as e:
            print(f"deltatune estimate: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    runners: dict[str, Callable[[argparse.Namespace], int]] = {
        "methods": _run_methods,
        "eval": run_eval,
        "merge": run_merge,
        "export": run_export,
        "combine": run_combine,
        "info": run_info,
        "generate": run_generate,
        "chat": run_chat,
    }
    try:
        return runners[args.command](args)
    except ValueError as e:
        print(f"deltatune {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run_methods(args: argparse.Namespace) -> int:
    _print_methods(args.json)
    return 0
