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

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, overload

__all__ = [
    "DEFAULT_DATA_DIR",
    "KINDS",
    "SPLITS",
    "Example",
    "Kind",
    "Loader",
    "Rows",
    "Split",
    "data_root",
    "files_loader",
    "infer_label_names",
    "label_names_of",
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
        tokens: Already tokenised ``(input_ids, labels)`` (-100 where no loss applies), for the causal
            formats of the user's data (:mod:`deltatune.train.userdata`); ``texts[0]`` is then the
            prompt a generation continues.
    """

    texts: tuple[str, ...]
    label: int | float | None = None
    target: str | None = None
    refs: tuple[str, ...] = ()
    tokens: tuple[Sequence[int], Sequence[int]] | None = field(default=None, repr=False)


#: ``loader(split, data_dir) -> examples``.
Loader = Callable[[Split, Path], Sequence[Example]]


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------

_INT = re.compile(r"[+-]?\d+")


def _parse_label(
    value: object, kind: Kind, label_names: Sequence[str], where: str, column: str
) -> int | float | None:
    """Class index, float score, or None (generation); ``where`` names the file and row."""

    def bad(expected: str) -> ValueError:
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


class ExampleView(Sequence[Example]):
    """A sequence of examples read on access, equal to any sequence of the same examples: a subclass
    says how many there are and how the example at a (non-negative) position is read (``_at``)."""

    def _at(self, index: int) -> Example:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):
            return [self._at(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self._at(index % len(self))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


class TableExamples(ExampleView):
    """Examples built on access from the rows of a memory-mapped table (the texts stay in its pages):
    a subclass says how one row becomes an :class:`Example` (``_example``) and how many there are."""

    table: Any

    def _example(self, index: int, row: dict[str, Any]) -> Example:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.table)

    def _at(self, index: int) -> Example:
        return self._example(index, self.table[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} examples)"


class Picked(ExampleView):
    """The examples of ``base`` at ``indices``, in that order, each read on access: a split of a
    memory-mapped table (the training side of a hold-out) that does not read every row to make it."""

    def __init__(self, base: Sequence[Example], indices: Sequence[int]) -> None:
        self.base = base
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def _at(self, index: int) -> Example:
        return self.base[self.indices[index]]

    def __repr__(self) -> str:
        return f"Picked({len(self)} of {self.base!r})"


class Rows(TableExamples):
    """The examples of a memory-mapped table of texts and labels, built on access.

    The labels are parsed, and every text column checked, when the view is made, so a bad row is
    refused before training starts, naming its file, row and column.
    """

    def __init__(
        self,
        table: Any,
        path: Path,
        text_fields: Sequence[str],
        label_field: str,
        kind: Kind,
        label_names: Sequence[str],
        origin: Sequence[int] | None = None,
    ) -> None:
        from .sources import column

        _check_columns(path, (*text_fields, label_field), table.column_names)
        row = (lambda i: i + 1) if origin is None else (lambda i: int(origin[i]) + 1)
        for name in text_fields if kind != "generation" else (*text_fields, label_field):
            _check_text(table, name, path, row)
        self.table = table
        self.text_fields = tuple(text_fields)
        self.kind = kind
        self.label_field = label_field
        values = column(table, label_field).to_pylist()
        self.labels: list[int | float | None] = (
            [None] * len(values)
            if kind == "generation"
            else [
                _parse_label(v, kind, label_names, f"{path} row {row(i)}", label_field)
                for i, v in enumerate(values)
            ]
        )

    def _example(self, index: int, row: dict[str, Any]) -> Example:
        texts = tuple(row[c] for c in self.text_fields)
        if self.kind == "generation":
            target = row[self.label_field]
            return Example(texts, None, target, (target,))
        return Example(texts, self.labels[index])


def _check_columns(path: Path, needed: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
            f"the file has: {', '.join(map(repr, columns))}"
        )


def _check_text(table: Any, name: str, path: Path, row: Callable[[int], int]) -> None:
    """Every value of column ``name`` is a string: the first row that is not (or is missing) is named
    (``row`` turns a table index into the file's row number)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .sources import column

    data = column(table, name)
    if not (pa.types.is_string(data.type) or pa.types.is_large_string(data.type)):
        value = data[0].as_py() if len(data) else None
        raise ValueError(f"{path} row {row(0)}: column {name!r} should be text, got {value!r} ({data.type})")
    if data.null_count:
        first = pc.index(pc.is_null(data), True).as_py()
        raise ValueError(f"{path} row {row(first)}: column {name!r} is missing")


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
) -> Sequence[Example]:
    """The examples of a ``.csv``, ``.tsv``, ``.jsonl``, ``.json`` or ``.parquet`` file (or a folder of
    them), read through the ``datasets`` library (:func:`deltatune.train.sources.read_table`: Arrow,
    memory-mapped, cached) and built on access.

    Args:
        path: The file; the format follows the extension. TSV fields are not quoted (a quote is an
            ordinary character); CSV fields follow the usual CSV quoting; CSV/TSV cells are text.
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
            wrong number of fields, a label that does not parse (with file and row).
    """
    from .sources import FILE_FORMATS, read_table

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if group_refs and kind != "generation":
        raise ValueError("group_refs only applies to generation (text targets)")
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data file not found: {p}")
    if p.is_file() and p.suffix.lower() not in FILE_FORMATS:
        raise ValueError(f"{p}: unknown file format {p.suffix!r}; use one of {', '.join(FILE_FORMATS)}")
    table = read_table(p, what="data file", fieldnames=fieldnames)
    rows = Rows(table, p, tuple(text_fields), label_field, kind, tuple(label_names))
    return _group_refs(rows) if group_refs else rows


def infer_label_names(path: Path, text_fields: Sequence[str], label_field: str) -> tuple[str, ...]:
    """The class names in ``path``'s ``label_field``: ``0..max`` if every label is a non-negative
    integer, else the distinct values in sorted order."""
    from .sources import column, read_table

    table = read_table(path, what="data file")
    _check_columns(path, (*text_fields, label_field), table.column_names)
    return label_names_of(column(table, label_field).to_pylist())


def label_names_of(values: Iterable[object]) -> tuple[str, ...]:
    """Class names from the labels seen: ``0..max`` if all are non-negative integers, else the
    distinct values, sorted."""
    distinct = {str(v).strip() for v in values}
    if all(_INT.fullmatch(v) and int(v) >= 0 for v in distinct):
        return tuple(str(i) for i in range(max(int(v) for v in distinct) + 1))
    return tuple(sorted(distinct))


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

    def loader(split: Split, data_dir: Path) -> Sequence[Example]:
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
