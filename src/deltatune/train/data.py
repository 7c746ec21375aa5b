"""Examples and the files they come from: :class:`Example`, :func:`load_file`, :func:`data_root`.

An :class:`Example` is one input (one or two texts) with its label, score or target text. This module
reads CSV, TSV and JSONL files into examples and knows where the built-in data sets live; which file
belongs to which task, and how a task is judged, is :mod:`deltatune.train.tasks`.

The data directory is, in order of precedence: the ``data_dir`` argument, the environment variable
``DELTATUNE_DATA``, and ``<repository root>/../shared/datasets`` (see its ``SOURCES.md`` for
provenance).

Example:
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "toy.tsv").write_text("sentence\\tlabel\\ngood film\\t1\\nbad film\\t0\\n")
    >>> rows = load_file(folder / "toy.tsv", ["sentence"], "label", "classification", label_names=["n", "p"])
    >>> rows[0]
    Example(texts=('good film',), label=1, target=None, refs=())
    >>> [e.label for e in rows]
    [1, 0]
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

__all__ = [
    "DEFAULT_DATA_DIR",
    "KINDS",
    "SPLITS",
    "Example",
    "Kind",
    "Loader",
    "Split",
    "data_root",
    "files_loader",
    "infer_label_names",
    "load_file",
]

Kind = Literal["classification", "regression", "generation"]
Split = Literal["train", "eval"]
KINDS: tuple[Kind, ...] = get_args(Kind)
SPLITS: tuple[Split, ...] = get_args(Split)

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
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if group_refs and kind != "generation":
        raise ValueError("group_refs only applies to generation (text targets)")
    p = Path(path)
    fields = tuple(text_fields)
    rows = _read_rows(p, _format_of(p), (*fields, label_field), fieldnames=fieldnames)
    examples = _to_examples(rows, p, fields, label_field, kind, tuple(label_names))
    return _group_refs(examples) if group_refs else examples


def infer_label_names(path: Path, text_fields: Sequence[str], label_field: str) -> tuple[str, ...]:
    """The class names in ``path``'s ``label_field``: ``0..max`` if every label is a non-negative
    integer, else the distinct values in sorted order."""
    rows = _read_rows(path, _format_of(path), (*text_fields, label_field))
    values = {str(row[label_field]).strip() for _, row in rows}
    if all(_INT.fullmatch(v) and int(v) >= 0 for v in values):
        return tuple(str(i) for i in range(max(int(v) for v in values) + 1))
    return tuple(sorted(values))


# ----------------------------------------------------------------------------------------------------
# Where the data sets live
# ----------------------------------------------------------------------------------------------------


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$DELTATUNE_DATA``, else :data:`DEFAULT_DATA_DIR`."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(_ENV_VAR)
    return Path(env) if env else DEFAULT_DATA_DIR


def files_loader(
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
    """A :data:`Loader` that reads ``data_dir / files[split]`` (a missing file says where the data sets
    go); the built-in tasks are made of these. ``name`` is the task's, for messages."""

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
