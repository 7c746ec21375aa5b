"""The user's own data: ``deltatune train --data PATH`` (formats, chat templates, assistant-only loss).

:func:`open_data` reads the training file (and ``--eval-data``, else a seeded ``--eval-fraction`` of
it) through :func:`deltatune.train.sources.read_table`, detects its format from the columns (or takes
``--data-format``) and checks every row, naming the file, row and field at fault. The formats, as in
TRL's ``SFTTrainer``:

=====================  ==============================  =================================================
format                 columns (flags rename them)     what trains
=====================  ==============================  =================================================
``messages``           ``messages``: ``[{role,         the assistant turns (``--loss-on all``: every
                       content}, ...]``                token); rendered with the tokenizer's chat
                                                       template (``--chat-template FILE`` supplies one)
``prompt_completion``  ``prompt``, ``completion``      the completion (and the end-of-text token)
``text``               ``text``                        every token
``classification``     ``text`` [+ ``--text-pair-      a task head; classes are the training labels
                       column``], ``label``
``regression``         ``text`` [+ pair], ``label``    a one-output head (labels are numbers)
=====================  ==============================  =================================================

The three causal formats are tokenised once with ``datasets.map`` into a cached Arrow table (input ids,
labels with -100 where no loss applies, lengths); a second run on the same file, tokenizer and options
reads that cache. Truncation to ``--max-length`` keeps the start; an example that keeps no token to
train on is skipped, one that loses some is truncated, and both are counted and reported
(:attr:`UserData.report`). The assistant spans of a conversation are found by rendering its prefixes
(``messages[:i]`` with the generation prompt, ``messages[:i+1]``); a template for which these are not
prefixes of the whole conversation is refused.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import Example, Rows, TableExamples, label_names_of
from .sources import column, read_table
from .tasks import Task

__all__ = [
    "CAUSAL_FORMATS",
    "DATA_FORMATS",
    "LOSS_ON",
    "ROLES",
    "SFTRows",
    "UserData",
    "detect_format",
    "open_data",
]

DATA_FORMATS = ("text", "prompt_completion", "messages", "classification", "regression")
CAUSAL_FORMATS = ("text", "prompt_completion", "messages")
LOSS_ON = ("assistant", "all")
ROLES = ("system", "user", "assistant", "tool")
_ENCODING_VERSION = "2"  # bump when the tokenised columns change meaning (invalidates the cache)


@dataclass(frozen=True)
class Columns:
    """Which column holds what (``--text-column`` and friends)."""

    text: str = "text"
    text_pair: str | None = None
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    label: str = "label"

    def of(self, fmt: str) -> tuple[str, ...]:
        """The columns format ``fmt`` reads."""
        if fmt == "messages":
            return (self.messages,)
        if fmt == "prompt_completion":
            return (self.prompt, self.completion)
        if fmt == "text":
            return (self.text,)
        return (self.text, *((self.text_pair,) if self.text_pair else ()), self.label)


def detect_format(table: Any, cols: Columns, where: str) -> str:
    """The format the columns call for: messages, prompt/completion, text + label, text. Columns of
    two formats (a JSONL file whose rows differ) name the first row of the second."""
    have = set(table.column_names)
    found = [
        fmt
        for fmt, needed in (
            ("messages", {cols.messages}),
            ("prompt_completion", {cols.prompt, cols.completion}),
            ("classification", {cols.text, cols.label}),
        )
        if needed <= have
    ]
    if not found and cols.text in have:
        found = ["text"]
    if len(found) > 1:
        for fmt in found:
            row = next((r for r in map(lambda c: _first_null(table, c), cols.of(fmt)) if r is not None), None)
            if row is not None:
                other = next(f for f in found if f != fmt)
                raise ValueError(
                    f"{where} row {row + 1}: no {' + '.join(map(repr, cols.of(fmt)))} where other rows have "
                    f"them: mixed formats in one file ({fmt} and {other}); keep one format per file"
                )
        raise ValueError(
            f"{where}: columns for several formats ({', '.join(found)}) in one file: {sorted(have)}; "
            "keep one format per file, or choose one with --data-format"
        )
    if not found:
        raise ValueError(
            f"{where}: cannot tell the format from the columns {sorted(have)}; expected 'messages', "
            "'prompt' + 'completion', 'text' + 'label' or 'text' (rename with --messages-column, "
            "--prompt-column, --completion-column, --text-column, --label-column, or set --data-format)"
        )
    return found[0]


def _first_null(table: Any, name: str) -> int | None:
    import pyarrow.compute as pc

    data = column(table, name)
    if not data.null_count:
        return None
    return int(pc.index(pc.is_null(data), True).as_py())


def _check_rows(table: Any, fmt: str, cols: Columns, where: str) -> None:
    """Every column of ``fmt`` present and filled in every row (a row of another format is named)."""
    needed = cols.of(fmt)
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{where}: format {fmt} needs column(s) {', '.join(map(repr, missing))}; the file has "
            f"{', '.join(map(repr, table.column_names))} (rename with --{missing[0]}-column style flags: "
            "--text-column, --label-column, --prompt-column, --completion-column, --messages-column)"
        )
    for name in needed:
        row = _first_null(table, name)
        if row is not None:
            others = [c for c in table.column_names if c not in needed and table[row][c] is not None]
            hint = f" (it has {', '.join(map(repr, others))}: mixed formats in one file?)" if others else ""
            raise ValueError(f"{where} row {row + 1}: field {name!r} is missing{hint}")


# ----------------------------------------------------------------------------------------------------
# Tokenising the causal formats
# ----------------------------------------------------------------------------------------------------


def check_conversation(messages: object, where: str, column: str) -> list[dict[str, str]]:
    """A conversation: a list of ``{role, content}`` with known roles and at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field {column!r} should be a non-empty list of {{role, content}} turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise ValueError(f"{where}: {column}[{i}] should be an object with 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise ValueError(
                f"{where}: {column}[{i}] has unknown role {turn['role']!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: {column}[{i}].content should be text, got {turn.get('content')!r}")
    if not any(t["role"] == "assistant" for t in messages):
        raise ValueError(f"{where}: {column!r} has no assistant turn (nothing to train on)")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return text


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end-of-turn included)."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True)) if i else 0
        end_text = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(end_text) or start > len(end_text):
            raise ValueError(
                f"{where}: the chat template does not render a conversation's turns as prefixes of the whole "
                "conversation, so the assistant turns cannot be located; give --chat-template FILE with one "
                "that does, or use --loss-on all"
            )
        spans.append((start, len(end_text)))
    return full, spans


@dataclass
class Encoder:
    """Turns a batch of rows of one causal format into ``input_ids``, ``labels``, ``length``,
    ``status`` (0 whole, 1 truncated, 2 skipped) and, for evaluation (``keep_text``), ``prompt`` and
    ``reference`` (a ``datasets.map`` function; one tokenizer call per batch)."""

    tokenizer: Any
    fmt: str
    cols: Columns
    max_length: int
    loss_on: str
    where: str
    origin: Sequence[int] | None = None  # the file's row of each table row (after a split)
    keep_text: bool = False

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = [
            f"{self.where} row {(i if self.origin is None else int(self.origin[i])) + 1}" for i in indices
        ]
        ids, labels, prompts, references = self._encode(batch, rows)
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "status": [], "targets": []}
        for row_ids, row_labels in zip(ids, labels, strict=True):
            status = 0
            if len(row_ids) > self.max_length:
                kept = row_labels[: self.max_length]
                status = 2 if all(x == -100 for x in kept) else 1
                row_ids, row_labels = row_ids[: self.max_length], kept
            out["input_ids"].append(row_ids)
            out["labels"].append(row_labels)
            out["length"].append(len(row_ids))
            out["status"].append(status)
            out["targets"].append(sum(1 for x in row_labels[1:] if x != -100))  # tokens the loss predicts
        out["prompt"] = prompts if self.keep_text else [""] * len(ids)
        out["reference"] = references if self.keep_text else [""] * len(ids)
        return out

    def _encode(
        self, batch: dict[str, list[Any]], rows: list[str]
    ) -> tuple[list[list[int]], list[list[int]], list[str], list[str]]:
        tok = self.tokenizer
        eos = tok.eos_token_id
        if self.fmt == "text":
            texts = [_text(batch, self.cols.text, j, w) for j, w in enumerate(rows)]
            ids = [[*x, eos] for x in tok(texts)["input_ids"]]
            return ids, [list(x) for x in ids], [""] * len(ids), [""] * len(ids)
        if self.fmt == "prompt_completion":
            prompts = [_text(batch, self.cols.prompt, j, w) for j, w in enumerate(rows)]
            completions = [_text(batch, self.cols.completion, j, w) for j, w in enumerate(rows)]
            p_ids = tok(prompts)["input_ids"]
            c_ids = tok(completions, add_special_tokens=False)["input_ids"]
            ids, labels = [], []
            for p, c in zip(p_ids, c_ids, strict=True):
                c = [*c, eos]
                ids.append([*p, *c])
                labels.append([*(p if self.loss_on == "all" else [-100] * len(p)), *c])
            return ids, labels, prompts, completions
        conversations = [
            check_conversation(m, w, self.cols.messages)
            for m, w in zip(batch[self.cols.messages], rows, strict=True)
        ]
        rendered = [assistant_spans(tok, m, w) for m, w in zip(conversations, rows, strict=True)]
        enc = tok(
            [full for full, _ in rendered],
            add_special_tokens=False,
            return_offsets_mapping=self.loss_on != "all",
        )
        ids = [list(x) for x in enc["input_ids"]]
        if self.loss_on == "all":
            labels = [list(x) for x in ids]
        else:
            labels = [
                _in_spans(row_ids, offsets, spans)
                for row_ids, offsets, (_, spans) in zip(ids, enc["offset_mapping"], rendered, strict=True)
            ]
        prompts, references = [], []
        for m in conversations:
            last = max(i for i, t in enumerate(m) if t["role"] == "assistant")
            prompts.append(_render(tok, m[:last], True) if self.keep_text else "")
            references.append(m[last]["content"])
        return ids, labels, prompts, references


def _in_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """``ids`` where a token starts inside one of ``spans`` (character ranges), else -100."""
    out = []
    k = 0
    for t, (a, _) in zip(ids, offsets, strict=True):
        while k < len(spans) and a >= spans[k][1]:
            k += 1
        out.append(t if k < len(spans) and spans[k][0] <= a else -100)
    return out


def _text(batch: dict[str, list[Any]], column: str, j: int, where: str) -> str:
    value = batch[column][j]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {column!r} should be text, got {value!r}")
    return value


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What the tokenised cache depends on of a tokenizer: its vocabulary, rules and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(repr((tokenizer.chat_template, tokenizer.eos_token_id, type(tokenizer).__name__)).encode())
    return h.hexdigest()[:16]


class SFTRows(TableExamples):
    """Tokenised examples of a causal format, built on access from the cached table."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.lengths: Any = column(table, "length").to_numpy()  # int32, one per example
        self.targets: Any = column(table, "targets").to_numpy()  # tokens the loss predicts, per example

    def _example(self, index: int, row: dict[str, Any]) -> Example:
        ref = row["reference"]
        tokens = (tuple(row["input_ids"]), tuple(row["labels"]))
        return Example((row["prompt"],), None, ref, (ref,), tokens=tokens)


# ----------------------------------------------------------------------------------------------------
# The run's data
# ----------------------------------------------------------------------------------------------------


@dataclass
class UserData:
    """A run's data from the user's files: its format, a :class:`~deltatune.train.tasks.Task` (kind,
    labels, metrics), and the two tables (train, eval) before tokenisation."""

    path: str
    fmt: str
    task: Task
    cols: Columns
    tables: dict[str, Any]
    where: dict[str, str]
    origin: dict[str, Sequence[int] | None] = field(default_factory=dict)
    report: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def causal(self) -> bool:
        return self.fmt in CAUSAL_FORMATS

    def examples(self, split: str, tokenizer: Any, max_length: int, loss_on: str) -> Sequence[Example]:
        """The examples of ``split`` (``"train"`` or ``"eval"``): rows (classification, regression) or
        tokenised rows (the causal formats), with the truncation counts in :attr:`report`."""
        table = self.tables[split]
        origin = self.origin.get(split)
        path = Path(self.where[split].split(" (held-out")[0])
        if not self.causal:
            texts = self.cols.of(self.fmt)[:-1]
            kind, names = self.task.kind, self.task.label_names
            return Rows(table, path, texts, self.cols.label, kind, names, origin)
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"{self.path}: the tokenizer has no end-of-text token; the causal formats need one"
            )
        if self.fmt == "messages" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{self.path}: messages data needs a chat template and this model's tokenizer has none; give "
                "one with --chat-template FILE (a Jinja template, as in tokenizer_config.json)"
            )
        if self.fmt == "messages" and loss_on != "all" and not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{self.path}: assistant-only loss needs a fast tokenizer (offsets); use --loss-on all"
            )
        encoder = Encoder(
            tokenizer, self.fmt, self.cols, max_length, loss_on, str(path), origin, split == "eval"
        )
        key = "|".join(
            (
                _ENCODING_VERSION,
                split,
                table._fingerprint,
                tokenizer_fingerprint(tokenizer),
                self.fmt,
                repr(self.cols),
                str(max_length),
                loss_on,
            )
        )
        encoded = table.map(
            encoder,
            batched=True,
            with_indices=True,
            remove_columns=table.column_names,
            features=_encoded_features(),
            new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
            desc=f"tokenising {split}",
        )
        status = column(encoded, "status").to_pylist()
        counts = {"examples": len(status), "truncated": status.count(1), "skipped": status.count(2)}
        self.report[split] = counts
        if counts["skipped"] == counts["examples"]:
            raise ValueError(
                f"{self.where[split]}: every example is longer than --max-length {max_length} before its "
                "first token to train on (the prompt alone fills it); raise --max-length"
            )
        if counts["skipped"]:
            encoded = encoded.filter(
                lambda s: s != 2, input_columns="status", new_fingerprint=encoded._fingerprint[:24] + "skip2"
            )
        return SFTRows(encoded)


def _encoded_features() -> Any:
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features(
        {
            "input_ids": ids,
            "labels": ids,
            "length": datasets.Value("int32"),
            "status": datasets.Value("int8"),
            "targets": datasets.Value("int32"),
            "prompt": datasets.Value("string"),
            "reference": datasets.Value("string"),
        }
    )


def _seeded_split(
    table: Any, fraction: float, seed: int, where: str
) -> tuple[Any, Any, list[int], list[int]]:
    """A seeded share ``fraction`` of the rows held out; each part keeps the file's row order."""
    n = len(table)
    held = max(1, math.floor(n * fraction))
    if n - held < 1:
        raise ValueError(
            f"{where}: {n} example(s) cannot be split into training and held-out ones (--eval-fraction "
            f"{fraction}); add examples or give --eval-data"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    kept, out = sorted(order[held:]), sorted(order[:held])
    return table.select(kept), table.select(out), kept, out


def open_data(
    path: str,
    *,
    eval_path: str | None = None,
    eval_fraction: float = 0.05,
    fmt: str | None = None,
    cols: Columns = Columns(),
    seed: int = 0,
) -> UserData:
    """Read, detect and check a run's data (see the module docstring); tokenising comes later
    (:meth:`UserData.examples`), once the model's tokenizer is known."""
    if fmt is not None and fmt not in DATA_FORMATS:
        raise ValueError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, not {fmt!r}")
    train = read_table(path, what="--data")
    where = {"train": str(path)}
    detected = detect_format(train, cols, f"--data {path}") if fmt is None else fmt
    if fmt is None:
        fmt = detected
        if fmt == "classification" and _numeric_scores(train, cols.label):
            fmt = "regression"
    _check_rows(train, fmt, cols, f"--data {path}")
    if eval_path is not None:
        held = read_table(eval_path, what="--eval-data")
        where["eval"] = str(eval_path)
        other = detect_format(held, cols, f"--eval-data {eval_path}") if fmt is None else fmt
        if fmt in CAUSAL_FORMATS and other != fmt and other in CAUSAL_FORMATS:
            raise ValueError(
                f"--eval-data {eval_path}: format {other}, but --data {path} is {fmt}; use one format"
            )
        _check_rows(held, fmt, cols, f"--eval-data {eval_path}")
        origin: dict[str, Sequence[int] | None] = {}
    else:
        train, held, kept, out = _seeded_split(train, eval_fraction, seed, f"--data {path}")
        where["eval"] = f"{path} (held-out {eval_fraction:g})"
        origin = {"train": kept, "eval": out}
    task = _task_for(Path(path).stem or "data", fmt, cols, train, held, where, origin.get("eval"))
    return UserData(str(path), fmt, task, cols, {"train": train, "eval": held}, where, origin)


def _numeric_scores(table: Any, name: str) -> bool:
    """Whether a label column holds non-integer numbers (a regression target)."""
    import pyarrow as pa

    data = column(table, name)
    if pa.types.is_floating(data.type):
        return any(v is not None and not float(v).is_integer() for v in data.to_pylist())
    return False


def _task_for(
    name: str,
    fmt: str,
    cols: Columns,
    train: Any,
    held: Any,
    where: dict[str, str],
    origin: Sequence[int] | None,
) -> Task:
    texts = cols.of(fmt)[:-1] if fmt in ("classification", "regression") else ("prompt",)
    if fmt == "classification":
        names = label_names_of(column(train, cols.label).to_pylist())
        if len(names) < 2:
            raise ValueError(
                f"--data {where['train']}: one label ({names[0]!r}) in column {cols.label!r}; a classifier "
                "needs two or more"
            )
        known = set(names)
        for i, value in enumerate(column(held, cols.label).to_pylist()):
            if str(value).strip() not in known:
                row = (i if origin is None else int(origin[i])) + 1
                raise ValueError(
                    f"{where['eval']} row {row}: label {value!r} in field {cols.label!r} is not among the "
                    f"training labels ({', '.join(names[:20])})"
                )
        metrics: tuple[str, ...] = ("accuracy", "f1", "matthews") if len(names) == 2 else ("accuracy",)
        return Task(
            name, "classification", texts, cols.label, names, metrics, "accuracy", _no_loader, fmt=fmt
        )
    if fmt == "regression":
        return Task(
            name, "regression", texts, cols.label, (), ("pearson", "spearman"), "pearson", _no_loader, fmt=fmt
        )
    metrics = ("exact_match", "bleu", "rouge_l")
    if fmt != "text" and _all_answers(held, fmt, cols):
        metrics = ("answer_accuracy", *metrics)
    if fmt == "text":
        metrics = ()
    return Task(name, "generation", texts, "reference", (), metrics, "loss", _no_loader, fmt=fmt)


def _all_answers(held: Any, fmt: str, cols: Columns) -> bool:
    """Whether every held-out reference ends with GSM8K's ``#### <answer>`` (answer accuracy then applies)."""
    if fmt == "prompt_completion":
        refs = column(held, cols.completion).to_pylist()
    else:
        refs = [
            next(
                (
                    t.get("content")
                    for t in reversed(m or [])
                    if isinstance(t, dict) and t.get("role") == "assistant"
                ),
                None,
            )
            for m in column(held, cols.messages).to_pylist()
        ]
    return bool(refs) and all(isinstance(r, str) and "####" in r for r in refs)


def _no_loader(split: str, data_dir: Path) -> Sequence[Example]:
    raise ValueError("this task's examples come from --data (UserData.examples), not from a data folder")
