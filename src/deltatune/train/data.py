"""Tasks and their data: the registry :data:`TASKS`, :func:`load_split` and :func:`load_file`.

A :class:`Task` says what a data set looks like (which columns are the inputs, which is the label,
what kind of problem it is) and which metrics judge it; its ``loader`` turns files into a list of
:class:`Example`. Every task has two splits, ``"train"`` and ``"eval"``.

The built-in tasks read the files in ``shared/datasets`` (see its ``SOURCES.md`` for provenance).
The data directory is, in order of precedence: the ``data_dir`` argument, the environment variable
``DELTATUNE_DATA``, and ``<repository root>/../shared/datasets``.

===========  ==============  ======================================  =============================
task         kind            files (train / eval)                    metrics (main first)
===========  ==============  ======================================  =============================
``sst2``     classification  glue/SST-2/train.tsv / dev.tsv          accuracy
``cola``     classification  glue/CoLA/train.tsv / dev.tsv           matthews, accuracy
``mrpc``     classification  glue/MRPC/train.tsv / dev.tsv           accuracy, f1
``rte``      classification  glue/RTE/train.tsv / dev.tsv            accuracy
``wnli``     classification  glue/WNLI/train.tsv / dev.tsv           accuracy
``stsb``     regression      glue/STS-B/train.tsv / dev.tsv          pearson, spearman
``agnews``   classification  agnews/dev.tsv / test.tsv               accuracy
``e2e``      generation      e2e/devset.csv / testset_w_refs.csv     bleu, rouge_l
``gsm8k``    generation      gsm8k/train.jsonl / test.jsonl          answer_accuracy
===========  ==============  ======================================  =============================

The GLUE "dev" files are the evaluation split (GLUE's test labels are not public). The full AG News
and E2E training sets are not in ``shared/datasets``; ``agnews`` trains on its 10,001-example dev
file (drawn from the AG train split) and ``e2e`` on the E2E development set.

Sources:

* GLUE: Wang, Singh, Michael, Hill, Levy & Bowman, "GLUE: A Multi-Task Benchmark and Analysis
  Platform for Natural Language Understanding", ICLR 2019. Its tasks: SST-2 (Socher et al., EMNLP
  2013), CoLA (Warstadt, Singh & Bowman, TACL 2019), MRPC (Dolan & Brockett, IWP 2005), RTE
  (Dagan et al. 2006 and successors), STS-B (Cer et al., SemEval 2017), WNLI (Levesque, Davis &
  Morgenstern, KR 2012). Label orders follow the GLUE distribution.
* AG News: Zhang, Zhao & LeCun, "Character-level Convolutional Networks for Text Classification",
  NeurIPS 2015 (classes in its order: World, Sports, Business, Sci/Tech).
* E2E: Novikova, Dušek & Rieser, "The E2E Dataset: New Challenges For End-to-End Generation",
  SIGDIAL 2017. Each meaning representation (MR) has several human references; for evaluation the
  references are grouped by MR.
* GSM8K: Cobbe et al., "Training Verifiers to Solve Math Word Problems", arXiv:2110.14168, 2021.
  The answer text ends with ``#### <final answer>``.

Example:
    >>> sorted(TASKS)
    ['agnews', 'cola', 'e2e', 'gsm8k', 'mrpc', 'rte', 'sst2', 'stsb', 'wnli']
    >>> t = TASKS["rte"]
    >>> t.kind, t.text_fields, t.label_names, t.num_labels, t.main_metric
    ('classification', ('sentence1', 'sentence2'), ('entailment', 'not_entailment'), 2, 'accuracy')
    >>> get_task("mnli")
    Traceback (most recent call last):
    ...
    ValueError: unknown task 'mnli'; known tasks: agnews, cola, e2e, gsm8k, mrpc, rte, sst2, stsb, wnli
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

__all__ = [
    "DEFAULT_DATA_DIR",
    "SPLITS",
    "TASKS",
    "Example",
    "Kind",
    "Loader",
    "Split",
    "Task",
    "data_root",
    "get_task",
    "load_file",
    "load_split",
]

Kind = Literal["classification", "regression", "generation"]
Split = Literal["train", "eval"]
SPLITS: tuple[Split, ...] = get_args(Split)
_KINDS: tuple[Kind, ...] = get_args(Kind)

#: ``<repository root>/../shared/datasets``; the repository root is three levels above ``deltatune/``.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "datasets"

_ENV_VAR = "DELTATUNE_DATA"
_WHERE_DATA = (
    f"put the data sets in ../shared/datasets next to the repository, set {_ENV_VAR}=/path/to/datasets, "
    "or pass data_dir="
)


@dataclass(frozen=True)
class Example:
    """One example.

    Attributes:
        texts: The input text(s), in the order of the task's ``text_fields`` (one for a single
            sentence, two for a sentence pair).
        label: Class index (``int``) for classification, score (``float``) for regression, ``None``
            for generation.
        target: The text to train on, for generation; ``None`` otherwise.
        refs: All acceptable references, for generation (at least ``(target,)``; for E2E evaluation
            every reference of the meaning representation); empty otherwise.
    """

    texts: tuple[str, ...]
    label: int | float | None = None
    target: str | None = None
    refs: tuple[str, ...] = ()


#: ``loader(split, data_dir) -> examples``.
Loader = Callable[[Split, Path], list[Example]]


@dataclass(frozen=True)
class Task:
    """What a data set looks like and how it is judged.

    Attributes:
        name: Registry key.
        kind: ``"classification"``, ``"regression"`` or ``"generation"``.
        text_fields: The input columns, in order.
        label_field: The label column (the target text column for generation).
        label_names: Class names, index = class id (classification only; empty otherwise).
        metrics: Names from :data:`deltatune.train.metrics.METRICS`.
        main_metric: The one to select checkpoints by; one of ``metrics``.
        loader: ``loader(split, data_dir) -> list[Example]``, ``split`` being ``"train"`` or ``"eval"``.
        description: One line for humans.
    """

    name: str
    kind: Kind
    text_fields: tuple[str, ...]
    label_field: str
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    loader: Loader = field(repr=False, compare=False)
    description: str = ""

    def __post_init__(self) -> None:
        from deltatune.train.metrics import METRICS  # metrics imports this module for types only

        where = f"task {self.name!r}"
        if self.kind not in _KINDS:
            raise ValueError(f"{where}: kind must be one of {', '.join(_KINDS)}, not {self.kind!r}")
        if not self.text_fields:
            raise ValueError(f"{where}: text_fields is empty")
        if self.kind == "classification" and len(self.label_names) < 2:
            raise ValueError(f"{where}: a classification task needs at least two label_names")
        if self.kind != "classification" and self.label_names:
            raise ValueError(f"{where}: label_names only make sense for classification")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"{where}: unknown metric(s) {unknown}; known: {', '.join(sorted(METRICS))}")
        if self.main_metric not in self.metrics:
            raise ValueError(f"{where}: main_metric {self.main_metric!r} is not in metrics {self.metrics}")

    @property
    def num_labels(self) -> int:
        """Number of outputs of a classification/regression head: classes, 1 (regression), 0 (generation)."""
        if self.kind == "classification":
            return len(self.label_names)
        return 1 if self.kind == "regression" else 0

    def load(
        self,
        split: Split,
        data_dir: str | os.PathLike[str] | None = None,
        limit: int | None = None,
        seed: int | None = None,
    ) -> list[Example]:
        """Same as :func:`load_split` with this task."""
        return load_split(self, split, data_dir=data_dir, limit=limit, seed=seed)

    @classmethod
    def from_file(
        cls,
        name: str,
        train_file: str | os.PathLike[str],
        eval_file: str | os.PathLike[str],
        text_fields: Sequence[str],
        label_field: str,
        kind: Kind,
        *,
        label_names: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        main_metric: str | None = None,
        group_eval_refs: bool = False,
        description: str = "",
    ) -> Task:
        """A task on the user's own files (CSV, TSV or JSONL, chosen by extension; see :func:`load_file`).

        The paths are used as given (relative paths are relative to the working directory); the
        ``data_dir`` passed at load time is ignored. For classification without ``label_names`` the
        classes are read from the training file: ``0..max`` if every label is a non-negative integer,
        else the distinct values in sorted order. Default metrics: accuracy, plus F1 and Matthews
        correlation for two classes (classification); Pearson and Spearman (regression); BLEU and
        ROUGE-L (generation). With ``group_eval_refs`` the evaluation examples of a generation task
        that share the same input become one example with all their references (as for E2E).
        """
        train_path, eval_path = Path(train_file), Path(eval_file)
        fields = tuple(text_fields)
        if kind == "classification" and label_names is None:
            label_names = _infer_label_names(train_path, fields, label_field)
        names = tuple(label_names or ())
        if metrics is None:
            metrics = _default_metrics(kind, len(names))
        metrics = tuple(metrics)
        if not metrics:
            raise ValueError(f"task {name!r}: metrics is empty")

        def loader(split: Split, data_dir: Path) -> list[Example]:
            path = train_path if split == "train" else eval_path
            return load_file(
                path,
                fields,
                label_field,
                kind,
                label_names=names,
                group_refs=group_eval_refs and split == "eval",
            )

        return cls(
            name=name,
            kind=kind,
            text_fields=fields,
            label_field=label_field,
            label_names=names,
            metrics=metrics,
            main_metric=main_metric or metrics[0],
            loader=loader,
            description=description or f"{kind} task on {train_path} / {eval_path}",
        )


def _default_metrics(kind: Kind, num_classes: int) -> tuple[str, ...]:
    if kind == "classification":
        return ("accuracy", "f1", "matthews") if num_classes == 2 else ("accuracy",)
    if kind == "regression":
        return ("pearson", "spearman")
    return ("bleu", "rouge_l")


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------

Row = tuple[int, Mapping[str, object]]  # (line number, column -> value)
_Format = Literal["csv", "tsv", "jsonl"]
_FORMATS: dict[str, _Format] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


def _format_of(path: Path) -> _Format:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown file format {path.suffix!r}; use one of {', '.join(_FORMATS)}")
    return fmt


def _read_rows(
    path: Path,
    fmt: _Format,
    needed: Sequence[str],
    *,
    fieldnames: Sequence[str] | None = None,
) -> list[Row]:
    """The data rows of ``path`` with their line numbers; checks the columns in ``needed`` exist.

    CSV uses standard quoting; TSV uses none (``csv.QUOTE_NONE``: a tab separates, a quote is a
    character, as in the GLUE files, whose texts contain unbalanced quotes). ``fieldnames`` names
    the columns of a file without a header line. A UTF-8 byte-order mark is dropped.
    """
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    rows: list[Row] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        if fmt == "jsonl":
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    got = type(obj).__name__
                    raise ValueError(f"{path} line {line_no}: expected a JSON object, got {got}")
                _check_columns(path, needed, list(obj), line_no)
                rows.append((line_no, obj))
        else:
            tsv = fmt == "tsv"
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
            columns = list(fieldnames) if fieldnames is not None else next(reader, None)
            if columns is None:
                raise ValueError(f"{path}: the file is empty (no header, no examples)")
            _check_columns(path, needed, columns, None)
            for values in reader:
                if not values:  # blank line
                    continue
                if len(values) != len(columns):
                    raise ValueError(
                        f"{path} line {reader.line_num}: expected {len(columns)} fields "
                        f"({', '.join(columns)}), found {len(values)}"
                    )
                rows.append((reader.line_num, dict(zip(columns, values, strict=True))))
    if not rows:
        raise ValueError(f"{path}: the file has no examples")
    return rows


def _check_columns(path: Path, needed: Sequence[str], columns: Sequence[str], line_no: int | None) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        where = f"{path}" if line_no is None else f"{path} line {line_no}"
        raise ValueError(
            f"{where}: missing column(s) {', '.join(map(repr, missing))}; "
            f"the file has: {', '.join(map(repr, columns))}"
        )


_INT = re.compile(r"[+-]?\d+")


def _parse_label(
    value: object, kind: Kind, label_names: Sequence[str], path: Path, line_no: int, column: str
) -> int | float | None:
    """Class index, float score, or None (generation)."""

    def bad(expected: str) -> ValueError:
        where = f"{path} line {line_no}"
        return ValueError(f"{where}: cannot parse label {value!r} in column {column!r}; {expected}")

    if kind == "regression":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad("expected a number")
        try:
            score = float(value)
        except ValueError:
            raise bad("expected a number") from None
        if not math.isfinite(score):
            raise bad("expected a finite number")
        return score
    if kind == "generation":
        return None
    # classification: a class name, or an integer class index
    n = len(label_names)
    expected = (
        f"expected one of {', '.join(map(repr, label_names))} or an integer 0..{n - 1}"
        if n
        else "expected a non-negative integer class index"
    )
    if isinstance(value, str):
        text = value.strip()
        if text in label_names:
            return label_names.index(text)
        if not _INT.fullmatch(text):
            raise bad(expected)
        index = int(text)
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        raise bad(expected)
    if index < 0 or (n and index >= n):
        raise bad(expected)
    return index


def _text(value: object, path: Path, line_no: int, column: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{path} line {line_no}: column {column!r} should be text, got {value!r}")
    return value


def _to_examples(
    rows: Iterable[Row],
    path: Path,
    text_fields: Sequence[str],
    label_field: str,
    kind: Kind,
    label_names: Sequence[str],
) -> list[Example]:
    examples = []
    for line_no, row in rows:
        texts = tuple(_text(row[c], path, line_no, c) for c in text_fields)
        if kind == "generation":
            target = _text(row[label_field], path, line_no, label_field)
            examples.append(Example(texts, None, target, (target,)))
        else:
            label = _parse_label(row[label_field], kind, label_names, path, line_no, label_field)
            examples.append(Example(texts, label))
    return examples


def _group_refs(examples: Iterable[Example]) -> list[Example]:
    """One example per distinct input, in order of first appearance, with all its references."""
    refs: dict[tuple[str, ...], list[str]] = {}
    for ex in examples:
        refs.setdefault(ex.texts, []).extend(ex.refs)
    return [Example(texts, None, r[0], tuple(r)) for texts, r in refs.items()]


def load_file(
    path: str | os.PathLike[str],
    text_fields: Sequence[str],
    label_field: str,
    kind: Kind,
    *,
    label_names: Sequence[str] = (),
    group_refs: bool = False,
    fieldnames: Sequence[str] | None = None,
) -> list[Example]:
    """Read examples from a ``.csv``, ``.tsv`` (both with a header line) or ``.jsonl`` file.

    Args:
        path: The file; the format follows the extension. TSV fields are not quoted (a quote is an
            ordinary character); CSV fields follow the usual CSV quoting.
        text_fields: The input columns/keys, in order.
        label_field: The label column (the target text for ``kind="generation"``).
        kind: ``"classification"``: labels are class names from ``label_names`` or integer class
            indices; ``"regression"``: numbers; ``"generation"``: text.
        label_names: Class names (classification). Without them labels must be integers >= 0.
        group_refs: Generation only: merge the examples that share the same inputs into one whose
            ``refs`` are all their targets (used for evaluation with several references).
        fieldnames: Column names of a CSV/TSV file that has no header line.

    Raises:
        ValueError: missing file, unknown extension, missing columns, no examples, a row with the
            wrong number of fields, a label that does not parse (with file and line number).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}, not {kind!r}")
    if group_refs and kind != "generation":
        raise ValueError("group_refs only applies to generation (text targets)")
    p = Path(path)
    fields = tuple(text_fields)
    rows = _read_rows(p, _format_of(p), (*fields, label_field), fieldnames=fieldnames)
    examples = _to_examples(rows, p, fields, label_field, kind, tuple(label_names))
    return _group_refs(examples) if group_refs else examples


def _infer_label_names(path: Path, text_fields: Sequence[str], label_field: str) -> tuple[str, ...]:
    rows = _read_rows(path, _format_of(path), (*text_fields, label_field))
    values = {str(row[label_field]).strip() for _, row in rows}
    if all(_INT.fullmatch(v) and int(v) >= 0 for v in values):
        return tuple(str(i) for i in range(max(int(v) for v in values) + 1))
    return tuple(sorted(values))


# ----------------------------------------------------------------------------------------------------
# Built-in tasks
# ----------------------------------------------------------------------------------------------------


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$DELTATUNE_DATA``, else :data:`DEFAULT_DATA_DIR`."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(_ENV_VAR)
    return Path(env) if env else DEFAULT_DATA_DIR


def _builtin_loader(
    name: str,
    files: Mapping[Split, str],
    text_fields: tuple[str, ...],
    label_field: str,
    kind: Kind,
    label_names: tuple[str, ...] = (),
    *,
    fieldnames: tuple[str, ...] | None = None,
    group_eval_refs: bool = False,
) -> Loader:
    def loader(split: Split, data_dir: Path) -> list[Example]:
        path = data_dir / files[split]
        if not path.is_file():
            raise ValueError(f"data file for task {name!r} ({split} split) not found: {path}; {_WHERE_DATA}")
        return load_file(
            path,
            text_fields,
            label_field,
            kind,
            label_names=label_names,
            fieldnames=fieldnames,
            group_refs=group_eval_refs and split == "eval",
        )

    return loader


def _glue(
    name: str,
    folder: str,
    text_fields: tuple[str, ...],
    label_field: str,
    label_names: tuple[str, ...],
    metrics: tuple[str, ...],
    description: str,
    *,
    fieldnames: tuple[str, ...] | None = None,
) -> Task:
    kind: Kind = "classification" if label_names else "regression"
    files: dict[Split, str] = {"train": f"glue/{folder}/train.tsv", "eval": f"glue/{folder}/dev.tsv"}
    return Task(
        name=name,
        kind=kind,
        text_fields=text_fields,
        label_field=label_field,
        label_names=label_names,
        metrics=metrics,
        main_metric=metrics[0],
        loader=_builtin_loader(
            name, files, text_fields, label_field, kind, label_names, fieldnames=fieldnames
        ),
        description=description,
    )


def _make_tasks() -> dict[str, Task]:
    tasks = [
        _glue(
            "sst2",
            "SST-2",
            ("sentence",),
            "label",
            ("negative", "positive"),
            ("accuracy",),
            "GLUE SST-2: movie-review sentence sentiment (binary)",
        ),
        _glue(
            "cola",
            "CoLA",
            ("sentence",),
            "label",
            ("unacceptable", "acceptable"),
            ("matthews", "accuracy"),
            "GLUE CoLA: grammatical acceptability (binary, Matthews correlation)",
            fieldnames=("source", "label", "original_label", "sentence"),
        ),
        _glue(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            "GLUE MRPC: paraphrase detection (sentence pairs)",
        ),
        _glue(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            "label",
            ("entailment", "not_entailment"),
            ("accuracy",),
            "GLUE RTE: textual entailment (sentence pairs)",
        ),
        _glue(
            "wnli",
            "WNLI",
            ("sentence1", "sentence2"),
            "label",
            ("not_entailment", "entailment"),
            ("accuracy",),
            "GLUE WNLI: Winograd-schema entailment (sentence pairs)",
        ),
        _glue(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            (),
            ("pearson", "spearman"),
            "GLUE STS-B: semantic similarity score 0..5 (regression)",
        ),
    ]
    agnews_names = ("World", "Sports", "Business", "Sci/Tech")
    agnews_files: dict[Split, str] = {"train": "agnews/dev.tsv", "eval": "agnews/test.tsv"}
    tasks.append(
        Task(
            name="agnews",
            kind="classification",
            text_fields=("text",),
            label_field="label",
            label_names=agnews_names,
            metrics=("accuracy",),
            main_metric="accuracy",
            loader=_builtin_loader(
                "agnews",
                agnews_files,
                ("text",),
                "label",
                "classification",
                agnews_names,
                fieldnames=("text", "label"),
            ),
            description="AG News: news topic (4 classes); trains on the 10,001-example dev file",
        )
    )
    e2e_files: dict[Split, str] = {"train": "e2e/devset.csv", "eval": "e2e/testset_w_refs.csv"}
    tasks.append(
        Task(
            name="e2e",
            kind="generation",
            text_fields=("mr",),
            label_field="ref",
            label_names=(),
            metrics=("bleu", "rouge_l"),
            main_metric="bleu",
            loader=_builtin_loader("e2e", e2e_files, ("mr",), "ref", "generation", group_eval_refs=True),
            description="E2E NLG: restaurant meaning representation -> text; trains on the dev set",
        )
    )
    gsm8k_files: dict[Split, str] = {"train": "gsm8k/train.jsonl", "eval": "gsm8k/test.jsonl"}
    tasks.append(
        Task(
            name="gsm8k",
            kind="generation",
            text_fields=("question",),
            label_field="answer",
            label_names=(),
            metrics=("answer_accuracy",),
            main_metric="answer_accuracy",
            loader=_builtin_loader("gsm8k", gsm8k_files, ("question",), "answer", "generation"),
            description="GSM8K: grade-school math word problems; the answer ends with '#### <number>'",
        )
    )
    return {t.name: t for t in sorted(tasks, key=lambda t: t.name)}


#: The built-in tasks by name.
TASKS: dict[str, Task] = _make_tasks()


def get_task(task: str | Task) -> Task:
    """``TASKS[task]`` with a helpful error; a :class:`Task` is returned as is."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def load_split(
    task: str | Task,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int | None = None,
) -> list[Example]:
    """The examples of one split (``"train"`` or ``"eval"``) of a task.

    Args:
        task: A name from :data:`TASKS` or a :class:`Task`.
        split: ``"train"`` or ``"eval"``.
        data_dir: The data directory (default: ``$DELTATUNE_DATA``, else :data:`DEFAULT_DATA_DIR`).
        limit: Keep at most this many examples: the first ``limit`` in file order, or, with ``seed``,
            the first ``limit`` of a shuffle seeded by ``seed`` (deterministic; a smaller limit gives a
            prefix of a larger one). ``seed`` without ``limit`` changes nothing.
        seed: See ``limit``.
    """
    t = get_task(task)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(map(repr, SPLITS))}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    examples = t.loader(split, data_root(data_dir))
    if limit is None:
        return examples
    if seed is None:
        return examples[:limit]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:limit]]
