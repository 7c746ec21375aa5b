"""The commands that answer with a saved adapter: ``deltatune generate`` and ``deltatune chat`` (see
:mod:`deltatune.cli`).

Both take an adapter folder, or the folder of a ``deltatune train`` run (its adapter is in
``RUN/adapter``), and load the base model once: the one the adapter records, else the one of the
run's ``metrics.json``, unless ``--model`` names another. Prompts are rendered with a chat template:
``--chat-template FILE``, else the one the adapter records (``task.chat_template``), else the
tokenizer's own. Decoding is greedy unless ``--temperature`` is above 0 (then temperature and top-p
sampling, seeded by ``--seed``) and stops at the tokenizer's EOS token.

``generate`` answers prompts in left-padded batches, each prompt with the adapter it names
(``--adapter NAME=PATH`` loads more adapters onto the same base; a batch mixing adapters runs under
:func:`deltatune.route`). ``chat`` keeps a conversation, streams each answer as it is generated and
drops the oldest turns when the conversation outgrows the model's positions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ..formats.files import write_file
from ..formats.io import CONFIG_NAME, WEIGHTS_NAME, read_config
from ..runtime.core import disabled, route, set_active
from ..train.provenance import recorded as harness_record
from .adapter import add_quantize_flag, add_recorded_tokens, load_adapters

__all__ = ["add_parsers", "run_chat", "run_generate"]

#: The name the positional adapter is loaded under.
MAIN = "default"
#: What a prompt's ``"adapter"`` names for the base model with no adapter (null does too).
BASE = "base"


def add_parsers(sub: Any) -> None:
    """Add ``generate`` and ``chat`` to the ``deltatune`` command's subparsers."""
    g = sub.add_parser("generate", help="answer prompts with a saved adapter (or several, per prompt)")
    c = sub.add_parser("chat", help="chat with a saved adapter in the terminal")
    for s in (g, c):
        add = s.add_argument
        add(
            "run_or_adapter", metavar="RUN_OR_ADAPTER", help="adapter folder, or a deltatune train run folder"
        )
        add("--model", help="base model (default: the one the adapter records, else the run's metrics.json)")
        add(
            "--chat-template",
            metavar="FILE",
            help="a Jinja chat template (default: the adapter's, else the tokenizer's)",
        )
        add("--system", metavar="TEXT", help="a system turn before the conversation")
        add("--compare-base", action="store_true", help="also answer with the base model (the adapter off)")
        add("--max-new-tokens", type=int, metavar="N", default=256, help="tokens per answer (default 256)")
        add(
            "--temperature",
            type=float,
            metavar="T",
            default=0.0,
            help="0: greedy (the default); above 0: sample",
        )
        add("--top-p", type=float, metavar="P", default=1.0, help="nucleus sampling (default 1.0: off)")
        add("--seed", type=int, metavar="N", default=0, help="seeds the sampling (default 0)")
        add("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
        add("--no-strict-base", action="store_true", help="load adapters saved on other weights of the base")
        add_quantize_flag(s)
    add = g.add_argument
    add("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    add("--prompts", metavar="FILE", help='JSON lines {"prompt": TEXT, "adapter": NAME} ("base", null: none)')
    add(
        "--adapter",
        dest="adapters",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help=f"load another adapter under NAME, for the prompts that name it (the positional one: {MAIN})",
    )
    add("--raw", action="store_true", help="send the prompt text as is, without the chat template")
    add("--batch-size", type=int, metavar="N", default=8, help="prompts per forward (default 8)")
    add("--out", metavar="FILE", help="write the answers there as JSON lines instead of printing them")


# -- loading -----------------------------------------------------------------------------------


def _adapter_folder(path: str, flag: str) -> Path:
    """The adapter folder ``path`` names: itself, or the ``adapter/`` of a ``deltatune train`` run."""
    folder = Path(path)
    for candidate in (folder, folder / "adapter"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise ValueError(
        f"{flag}{path}: neither an adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME}) nor a deltatune train "
        "run folder with one in adapter/"
    )


def _recorded_base(folder: Path, config: dict[str, Any]) -> str | None:
    """The base model an adapter records, else the one of the ``metrics.json`` of the run beside it."""
    if config.get("base_model"):
        return str(config["base_model"])
    metrics = folder.parent / "metrics.json"
    try:
        model = json.loads(metrics.read_text()).get("config", {}).get("model") if metrics.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        model = None
    return model if isinstance(model, str) and model else None


def _extra_adapters(specs: Sequence[str]) -> dict[str, Path]:
    """``--adapter NAME=PATH`` flags as name -> adapter folder."""
    found: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec}: expected NAME=PATH, e.g. --adapter math=runs/gsm8k-lora")
        if name in (MAIN, BASE) or name in found:
            what = f"{MAIN!r} names the positional adapter and {BASE!r} the base model"
            raise ValueError(
                f"--adapter {spec}: {what if name not in found else 'given twice'}; pick another name"
            )
        found[name] = _adapter_folder(path, f"--adapter {name}=")
    return found


def _load(args: argparse.Namespace, extra: dict[str, Path], *, raw: bool, command: str) -> tuple[Any, Any]:
    """The base model with every adapter loaded (the positional one as :data:`MAIN`, and active), in
    eval mode on the chosen device, and its tokenizer with the chat template set."""
    from ..train.models import load_model

    folders = {MAIN: _adapter_folder(args.run_or_adapter, ""), **extra}
    configs = {name: read_config(folder) for name, folder in folders.items()}
    harness = {
        name: harness_record(configs[name], str(folder / CONFIG_NAME)) for name, folder in folders.items()
    }
    for name in configs:
        kind = (harness[name]["head"] or {}).get("kind", "generation")
        if kind != "generation":
            raise ValueError(
                f"{folders[name]}: saved on a {kind} head; {command} needs an adapter of a causal language "
                "model (head kind generation)"
            )
    recorded = {name: _recorded_base(folders[name], config) for name, config in configs.items()}
    bases = {name: base for name, base in recorded.items() if base}
    first = next(iter(bases), None)
    for name, base in bases.items():
        if first is not None and base != bases[first]:
            raise ValueError(
                f"the adapters belong on different base models: {folders[first]} records {bases[first]}, "
                f"{folders[name]} records {base}; load adapters of one base model in one command"
            )
    model_name = args.model or next(iter(bases.values()), None)
    if not model_name:
        raise ValueError(
            f"{folders[MAIN]}: pass --model (an alias, a local model folder or a hub name): its "
            f"{CONFIG_NAME} records no base_model and there is no metrics.json of a deltatune run beside it"
        )
    if args.chat_template is not None and not Path(args.chat_template).is_file():
        raise ValueError(f"--chat-template {args.chat_template}: no such file")
    model, tokenizer = load_model(model_name, "generation")
    add_recorded_tokens(model, tokenizer, folders)
    task = harness[MAIN]["task"]
    recorded_template = task.get("chat_template") if isinstance(task, dict) else None
    if args.chat_template is not None:
        tokenizer.chat_template = Path(args.chat_template).read_text()
    elif isinstance(recorded_template, str):
        tokenizer.chat_template = recorded_template
    if not raw and not getattr(tokenizer, "chat_template", None):
        fixes = "--chat-template FILE (a Jinja chat template)" + (
            ", or --raw to send the prompts as they are" if command == "generate" else ""
        )
        raise ValueError(
            f"the tokenizer of {model_name} has no chat template and the adapter records none: pass {fixes}"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)  # first: a 4-bit base is quantised where it runs
    strict = not args.no_strict_base
    load_adapters(model, folders, args.quantize, strict_base=strict, active=MAIN)
    model.eval()
    return model, tokenizer


def _check_numbers(args: argparse.Namespace) -> None:
    if getattr(args, "batch_size", 1) < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or above, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")


def _sampling(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """``generate()`` keywords: greedy, or temperature and top-p sampling (no top-k) above 0."""
    kw: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if args.temperature > 0:
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
    else:  # (None: no warning about sampling settings a model's generation_config may hold)
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text: str = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text


def _decode(tokenizer: Any, ids: Any) -> str:
    """The text of ``ids`` without special tokens (no clean-up of spaces, so that a prefix's text is a
    prefix of the whole's)."""
    text: str = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device  # type: ignore[no-any-return]


# -- generate ----------------------------------------------------------------------------------


def _read_prompts(path: str, names: set[str]) -> list[tuple[str, str | None]]:
    """(prompt, adapter name or None for the base) of each line of a ``--prompts`` file."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    jobs: list[tuple[str, str | None]] = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--prompts {path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f'{where}: not JSON ({e}); expected {{"prompt": TEXT, "adapter": NAME}}') from e
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'{where}: no "prompt" string; expected {{"prompt": TEXT, "adapter": NAME}}')
        name = record.get("adapter", MAIN)
        if name is not None and name != BASE and name not in names:
            raise ValueError(
                f"{where}: unknown adapter {name!r}; loaded: {', '.join(sorted(names))} (add --adapter "
                f"{name}=PATH), or {BASE} (null) for the base model"
            )
        jobs.append((record["prompt"], None if name in (None, BASE) else name))
    if not jobs:
        raise ValueError(f"--prompts {path}: no prompts in it")
    return jobs


@contextlib.contextmanager
def _adapters(model: Any, names: Sequence[str | None]) -> Iterator[None]:
    """The adapters of a batch: one for every row (the base where None), or, mixed, per row."""
    if len(set(names)) > 1:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(route(model, names))
            except ValueError as e:
                raise ValueError(f"{e}; give its prompts batches of their own (--batch-size 1)") from e
            yield
    elif names[0] is None:
        with disabled(model):
            yield
    else:
        set_active(model, names[0])
        yield


def _answer(model: Any, tokenizer: Any, texts: list[str], kw: dict[str, Any], *, raw: bool) -> list[str]:
    """The answers to a batch of prompts, left-padded so that every row continues its own prompt."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:  # (a rendered template holds its own BOS, if any; raw text gets the tokenizer's)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=raw).to(_device(model))
    finally:
        tokenizer.padding_side = side
    with torch.inference_mode():
        out = model.generate(**enc, **kw)
    return [_decode(tokenizer, row).strip() for row in out[:, enc["input_ids"].shape[1] :]]


def run_generate(args: argparse.Namespace) -> int:
    """``deltatune generate``: the answers to ``--prompt``/``--prompts``, printed (the text of a single
    ``--prompt``; else one JSON object per line: prompt, adapter, output, and base_output with
    ``--compare-base``) or written to ``--out``."""
    _check_numbers(args)
    if args.raw and args.system is not None:
        raise ValueError("--system needs the chat template: drop --raw, or put the system text in the prompt")
    extra = _extra_adapters(args.adapters)
    jobs: list[tuple[str, str | None]] = [(p, MAIN) for p in args.prompt]
    if args.prompts is not None:
        jobs += _read_prompts(args.prompts, {MAIN, *extra})
    if not jobs:
        raise ValueError(
            'nothing to answer: pass --prompt TEXT (repeatable) or --prompts FILE ({"prompt": ...} lines)'
        )
    model, tokenizer = _load(args, extra, raw=args.raw, command="generate")
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    texts = [
        p if args.raw else _render(tokenizer, [*system, {"role": "user", "content": p}]) for p, _ in jobs
    ]
    kw = _sampling(args, tokenizer)
    torch.manual_seed(args.seed)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(jobs), args.batch_size):
        end = start + args.batch_size
        batch, names = texts[start:end], [n for _, n in jobs[start:end]]
        with _adapters(model, names):
            outputs = _answer(model, tokenizer, batch, kw, raw=args.raw)
        if args.compare_base:
            with disabled(model):
                base_outputs = _answer(model, tokenizer, batch, kw, raw=args.raw)
        for i, output in enumerate(outputs):
            row = {"prompt": jobs[start + i][0], "adapter": names[i] or BASE, "output": output}
            if args.compare_base:
                row["base_output"] = base_outputs[i]
            rows.append(row)
    if args.out is None and args.prompts is None and len(rows) == 1 and not args.compare_base:
        print(rows[0]["output"])
        return 0
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.out is None:
        sys.stdout.write(lines)
        return 0
    write_file(args.out, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    print(f"wrote {len(rows)} answer(s) to {args.out}")
    return 0


# -- chat --------------------------------------------------------------------------------------


class _Stream:
    """A streamer for ``generate()`` (its ``put`` / ``end`` protocol; transformers itself is imported
    only by the commands that load a model): writes an answer to ``output`` as its tokens come, the
    prompt skipped, special tokens and leading spaces dropped, a trailing incomplete character held
    back until its bytes are all there."""

    def __init__(self, tokenizer: Any, output: TextIO) -> None:
        self.tokenizer, self.output = tokenizer, output
        self.ids: list[int] = []
        self.prompt_seen = False
        self.shown = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() passes the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, *, final: bool) -> None:
        text = _decode(self.tokenizer, self.ids).lstrip()
        text = text if final else text.rstrip("\ufffd")
        if len(text) > self.shown:
            self.output.write(text[self.shown :])
            self.output.flush()
            self.shown = len(text)


def _positions(model: Any) -> int | None:
    config = model.config
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(value) if value else None


def _fit(tokenizer: Any, history: list[dict[str, str]], keep: int, limit: int | None, out: TextIO) -> Any:
    """The token ids of the rendered conversation, after dropping its oldest turns (after the first
    ``keep`` messages, the system turn) until it fits ``limit``; None, the conversation untouched, if its
    last message alone does not."""
    trial, dropped = list(history), 0
    while True:
        ids = tokenizer(_render(tokenizer, trial), return_tensors="pt", add_special_tokens=False)["input_ids"]
        if limit is None or ids.shape[1] <= limit:
            break
        if len(trial) <= keep + 1:
            out.write(
                f"(not sent: your message makes {ids.shape[1]} tokens, more than the {limit} the model's "
                "positions leave beside --max-new-tokens)\n"
            )
            return None
        del trial[keep : keep + (2 if trial[keep + 1]["role"] == "assistant" else 1)]
        dropped += 1
    history[:] = trial
    if dropped:
        out.write(f"(dropped the {dropped} oldest turn(s): the conversation outgrew the model's positions)\n")
    return ids


def _say(model: Any, tokenizer: Any, ids: Any, kw: dict[str, Any], label: str, out: TextIO) -> str:
    """Stream one answer to ``ids`` after ``label``; return its text."""
    out.write(label)
    out.flush()
    ids = ids.to(_device(model))
    with torch.inference_mode():
        new = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), streamer=_Stream(tokenizer, out), **kw
        )
    out.write("\n")
    return _decode(tokenizer, new[0, ids.shape[1] :]).strip()


def run_chat(
    args: argparse.Namespace, *, input_fn: Callable[[str], str] = input, output: TextIO | None = None
) -> int:
    """``deltatune chat``: a conversation in the terminal (``input_fn`` reads a line, ``output``, by
    default stdout, shows the answers). ``/reset`` clears the conversation (``--system`` stays),
    ``/exit``, ``/quit`` or end of input ends it."""
    out = output if output is not None else sys.stdout
    _check_numbers(args)
    model, tokenizer = _load(args, {}, raw=False, command="chat")
    positions = _positions(model)
    if positions is not None and args.max_new_tokens >= positions:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for the conversation in the model's "
            f"{positions} positions; pass fewer"
        )
    limit = positions - args.max_new_tokens if positions is not None else None
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history = list(system)
    kw = _sampling(args, tokenizer)
    torch.manual_seed(args.seed)
    out.write("/reset clears the conversation, /exit ends it\n")
    while True:
        try:
            line = input_fn("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = list(system)
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/") and " " not in line:
            out.write(f"(unknown command {line}: /reset clears the conversation, /exit or /quit ends it)\n")
            continue
        history.append({"role": "user", "content": line})
        ids = _fit(tokenizer, history, len(system), limit, out)
        if ids is None:
            history.pop()
            continue
        answer = _say(model, tokenizer, ids, kw, "adapter> " if args.compare_base else "assistant> ", out)
        if args.compare_base:
            with disabled(model):
                _say(model, tokenizer, ids, kw, "base> ", out)
        history.append({"role": "assistant", "content": answer})
