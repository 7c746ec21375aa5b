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
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data import Example, Picked, Rows, TableExamples, label_names_of
from .formats import (
    CAUSAL_FORMATS,
    DATA_FORMATS,
    ENCODING_VERSION,
    LOSS_ON,
    Columns,
    Encoder,
    check_rows,
    detect_format,
    encoded_features,
    targets_of,
    tokenizer_fingerprint,
)
from .sources import column, explain, read_table, stream_table
from .streaming import StreamedExamples
from .tasks import EVAL_SAMPLE_SEED, Task

__all__ = [
    "CAUSAL_FORMATS",
    "DATA_FORMATS",
    "LOSS_ON",
    "SFTRows",
    "UserData",
    "detect_format",
    "open_data",
]


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
    #: ``--streaming``: the training rows as a ``datasets.IterableDataset`` and the files it reads
    #: (``tables["train"]`` then holds only the first rows, which the format was told from).
    stream: tuple[Any, list[Path]] | None = None
    seed: int = 0

    @property
    def causal(self) -> bool:
        return self.fmt in CAUSAL_FORMATS

    def examples(
        self, split: str, tokenizer: Any, max_length: int, loss_on: str
    ) -> Sequence[Example] | StreamedExamples:
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
        if split == "train" and self.stream is not None:
            return StreamedExamples(self.stream[0], self.stream[1], encoder, seed=self.seed)
        key = "|".join(
            (
                ENCODING_VERSION,
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
            features=encoded_features(),
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
    cols: Columns | None = None,
    seed: int = 0,
    streaming: bool = False,
) -> UserData:
    """Read, detect and check a run's data (see the module docstring); tokenising comes later
    (:meth:`UserData.examples`), once the model's tokenizer is known."""
    cols = cols or Columns()
    if fmt is not None and fmt not in DATA_FORMATS:
        raise ValueError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, not {fmt!r}")
    forced = fmt
    stream = None
    if streaming:
        if eval_path is None:
            raise ValueError(
                "--streaming needs --eval-data: holding out part of a stream would take a pass over it first"
            )
        stream = stream_table(path, what="--data")
        train = _first_rows(stream, path)
    else:
        train = read_table(path, what="--data")
    where = {"train": str(path)}
    if fmt is None:
        fmt = detect_format(train, cols, f"--data {path}")
        if fmt == "classification" and _numeric_scores(train, cols.label):
            fmt = "regression"
    if streaming and fmt not in CAUSAL_FORMATS:
        raise ValueError(
            f"--data {path}: --streaming trains the causal formats ({', '.join(CAUSAL_FORMATS)}); this is "
            f"{fmt}, whose classes need a pass over the file: drop --streaming"
        )
    check_rows(train, fmt, cols, f"--data {path}")
    if eval_path is not None:
        held = read_table(eval_path, what="--eval-data")
        where["eval"] = str(eval_path)
        other = detect_format(held, cols, f"--eval-data {eval_path}") if forced is None else fmt
        if fmt in CAUSAL_FORMATS and other != fmt and other in CAUSAL_FORMATS:
            raise ValueError(
                f"--eval-data {eval_path}: format {other}, but --data {path} is {fmt}; use one format"
            )
        check_rows(held, fmt, cols, f"--eval-data {eval_path}")
        origin: dict[str, Sequence[int] | None] = {}
    else:
        train, held, kept, out = _seeded_split(train, eval_fraction, seed, f"--data {path}")
        where["eval"] = f"{path} (held-out {eval_fraction:g})"
        origin = {"train": kept, "eval": out}
    task = _task_for(Path(path).stem or "data", fmt, cols, train, held, where, origin.get("eval"))
    tables = {"train": train, "eval": held}
    return UserData(str(path), fmt, task, cols, tables, where, origin, stream=stream, seed=seed)


def _first_rows(stream: tuple[Any, list[Path]], path: str, n: int = 1000) -> Any:
    """The first ``n`` rows of a stream as a table (the format is told, and checked, from them)."""
    import datasets

    rows, files = stream
    try:
        head = list(islice(iter(rows), n))
    except Exception as e:
        raise explain(e, files, "--data") from None
    if not head:
        raise ValueError(f"--data {path}: the file has no examples")
    return datasets.Dataset.from_list(head)


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


# ----------------------------------------------------------------------------------------------------
# What the training loop asks of a run's data
# ----------------------------------------------------------------------------------------------------


def open_for(cfg: TrainConfig) -> UserData:
    """The data of a run with ``cfg.data`` (its column options, held-out part and seed)."""
    assert cfg.data is not None
    columns = Columns(
        text=cfg.text_column,
        text_pair=cfg.text_pair_column,
        prompt=cfg.prompt_column,
        completion=cfg.completion_column,
        messages=cfg.messages_column,
        label=cfg.label_column,
    )
    return open_data(
        cfg.data,
        streaming=cfg.streaming,
        eval_path=cfg.eval_data,
        eval_fraction=cfg.eval_fraction,
        fmt=cfg.data_format,
        cols=columns,
        seed=cfg.seed,
    )


def user_examples(
    source: UserData, tokenizer: Any, cfg: TrainConfig, main: bool = True
) -> tuple[Sequence[Example] | StreamedExamples, Sequence[Example]]:
    """Both splits of the user's data (tokenised where causal), limited as asked; truncation reported
    (a stream's training split: at the end of the run, from the rows it read)."""
    splits: list[Sequence[Example] | StreamedExamples] = []
    for split, limit in (("train", cfg.train_limit), ("eval", cfg.eval_limit)):
        examples = source.examples(split, tokenizer, cfg.max_length, cfg.loss_on)
        if isinstance(examples, StreamedExamples):
            examples.limit = limit  # the first rows of the stream
            splits.append(examples)
            continue
        if limit is not None and limit < len(examples):
            order = list(range(len(examples)))
            random.Random(cfg.seed if split == "train" else EVAL_SAMPLE_SEED).shuffle(order)
            examples = [examples[i] for i in order[:limit]]
        splits.append(examples)
        counts = source.report.get(split)
        if counts and main and (counts["truncated"] or counts["skipped"]):
            print(
                f"{source.where[split]}: {counts['truncated']} of {counts['examples']} examples truncated "
                f"to --max-length {cfg.max_length} (some tokens to train on cut), {counts['skipped']} "
                "skipped (no token to train on within it)",
                file=sys.stderr,
            )
    held = splits[1]
    assert not isinstance(held, StreamedExamples)
    return splits[0], held


def _token_columns(examples: Sequence[Example]) -> tuple[Any, Any] | None:
    """The token counts and target counts (numpy) of a tokenised table's examples, or of a subset
    picked from one (the training side of a hold-out), read from its columns without building any
    example; None for other sequences."""
    if isinstance(examples, SFTRows):
        return examples.lengths, examples.targets
    if isinstance(examples, Picked):
        base = _token_columns(examples.base)
        if base is not None:
            picked = list(examples.indices)
            return base[0][picked], base[1][picked]
    return None


def lengths_of(examples: Sequence[Example] | StreamedExamples) -> Sequence[int] | None:
    """Token counts of tokenised examples (for length grouping); None for others."""
    if isinstance(examples, StreamedExamples):
        return None  # the stream groups its own windows
    if (columns := _token_columns(examples)) is not None:
        lengths: list[int] = columns[0].tolist()
        return lengths
    if examples and all(e.tokens is not None for e in examples):
        return [len(e.tokens[0]) for e in examples if e.tokens is not None]
    return None


def expected_targets(examples: Sequence[Example] | StreamedExamples, cfg: TrainConfig) -> float | None:
    """The target tokens a global batch holds on average (tokenised examples; None for others): the
    fixed count a step's loss is divided by (see :func:`step`)."""
    if isinstance(examples, StreamedExamples):
        if examples.mean_targets is None:
            return None  # known once the first window is read (the loop asks again then)
        return float(examples.mean_targets * cfg.batch_size * cfg.grad_accum)
    if (columns := _token_columns(examples)) is not None:
        mean = float(columns[1].mean())
    elif examples and all(e.tokens is not None for e in examples):
        mean = sum(targets_of(e.tokens[1]) for e in examples if e.tokens) / len(examples)
    else:
        return None
    return float(max(mean, 1.0) * cfg.batch_size * cfg.grad_accum)
