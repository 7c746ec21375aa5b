"""Data files into Arrow tables: :func:`read_table`, through the ``datasets`` library.

One reader for the built-in tasks' files and the user's own (``deltatune train --data PATH``):
``.jsonl`` / ``.json``, ``.csv``, ``.tsv``, ``.parquet``, a folder of such files (one format), a folder
written by ``Dataset.save_to_disk``, or a hub data set name where there is a network. The table is
built once into deltatune's cache (``$DELTATUNE_CACHE/datasets``, see
:func:`deltatune.train.smollm2.default_cache_root`) and memory-mapped from there: a file of any size
costs its pages, not Python objects, and a second run on an unchanged file reads the cache.

CSV and TSV cells are read as text, exactly as written (no ``NA`` / ``null`` guessing); labels are
parsed by the caller. TSV is unquoted (a quote is an ordinary character, as in the GLUE files); CSV
follows the usual quoting. JSON keeps its types.

Bad files are refused with the file, and where it can be found the line, at fault: a missing path, an
empty file, a header without rows, invalid UTF-8, a JSONL line that is not a JSON object.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hub import HUB_TIMEOUT_S, hub_settings, offline
from .smollm2 import default_cache_root

if TYPE_CHECKING:
    import datasets

__all__ = ["FILE_FORMATS", "cache_dir", "column", "explain", "read_table", "stream_table"]

#: File suffix -> ``datasets`` builder.
FILE_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}


#: Bytes of JSON read per block: 1 MB instead of the ``datasets`` default of 10 MB takes about 100 MB
#: off the peak memory of converting a large file (320 MB: 305 -> 202 MB), at no cost in time.
_JSON_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where the Arrow tables and the tokenised columns are cached: ``<deltatune cache>/datasets``."""
    return default_cache_root() / "datasets"


def column(table: datasets.Dataset, name: str) -> Any:
    """A column of ``table`` as a ``pyarrow.ChunkedArray``, in the table's row order (a ``select`` or
    ``filter`` is an index over the file's rows; ``table.data`` would ignore it)."""
    return table.with_format("arrow")[name]


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - the [train] extra installs it
        raise ValueError("reading data needs the datasets library: pip install 'deltatune[train]'") from e
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def read_table(
    path: str | os.PathLike[str],
    *,
    what: str = "data",
    fieldnames: Sequence[str] | None = None,
) -> datasets.Dataset:
    """The rows of ``path`` as a memory-mapped ``datasets.Dataset``.

    Args:
        path: A file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``), a folder of files of
            one of these formats, a ``save_to_disk`` folder, or a hub data set name.
        what: How the messages name the input (``"--data"``, ``"task sst2 (train split)"``).
        fieldnames: Column names of a CSV/TSV file without a header line.

    Raises:
        ValueError: what is wrong, naming the file (and the line where one is at fault).
    """
    p = Path(path)
    if p.is_dir():
        table = _read_folder(p, what, fieldnames)
    elif p.is_file():
        table = _read_files([p], what, fieldnames)
    else:
        table = _read_hub(str(path), what)
    if len(table) == 0:
        raise ValueError(f"{what} {path}: the file has no examples")
    return table


def _read_folder(folder: Path, what: str, fieldnames: Sequence[str] | None) -> datasets.Dataset:
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        ds = _datasets()
        table = ds.load_from_disk(str(folder))
        if isinstance(table, ds.DatasetDict):
            if "train" not in table:
                raise ValueError(f"{what} {folder}: a DatasetDict without a 'train' split ({list(table)})")
            table = table["train"]
        return table
    return _read_files(_folder_files(folder, what), what, fieldnames)


def _folder_files(folder: Path, what: str) -> list[Path]:
    """The data files of a folder, all of one format."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in FILE_FORMATS)
    if not files:
        known = ", ".join(FILE_FORMATS)
        raise ValueError(f"{what} {folder}: a folder without data files ({known}) or a save_to_disk dataset")
    suffixes = sorted({f.suffix.lower() for f in files})
    if len({FILE_FORMATS[s] for s in suffixes}) > 1 or {".csv", ".tsv"} <= set(suffixes):
        raise ValueError(
            f"{what} {folder}: files of several formats ({', '.join(suffixes)}); keep one per folder"
        )
    return files


def _read_hub(name: str, what: str, streaming: bool = False) -> Any:
    looks_local = name.startswith((".", "/", "~")) or Path(name).suffix.lower() in FILE_FORMATS
    if looks_local or name.count("/") > 1:
        raise ValueError(f"{what} {name}: no such file or folder")
    ds = _datasets()
    try:  # (a short timeout: an unreachable hub fails in seconds, not after half a minute of retries)
        with hub_settings(offline=offline(data=True), timeout_s=HUB_TIMEOUT_S):
            table = ds.load_dataset(name, split="train", cache_dir=str(cache_dir()), streaming=streaming)
    except Exception as e:  # the hub client raises many types: offline, unknown name, gated
        raise ValueError(
            f"{what} {name}: not a local file or folder, and not loadable as a hub data set "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); offline, give a local "
            "file (.jsonl, .json, .csv, .tsv, .parquet) or a save_to_disk folder"
        ) from None
    return table


def _read_files(files: list[Path], what: str, fieldnames: Sequence[str] | None) -> datasets.Dataset:
    ds = _datasets()
    builder, kwargs = _builder_args(files, what, fieldnames)
    try:
        table = ds.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir()), **kwargs
        )
    except Exception as e:
        raise explain(e, files, what) from None
    return table


def _builder_args(
    files: list[Path], what: str, fieldnames: Sequence[str] | None
) -> tuple[str, dict[str, Any]]:
    """The ``datasets`` builder for ``files`` and its options (CSV/TSV cells as text, unquoted TSV)."""
    ds = _datasets()
    builder = FILE_FORMATS[files[0].suffix.lower()]
    kwargs: dict[str, Any] = {}
    for f in files:
        _check_readable(f, what)
    if builder == "json":
        kwargs.update(chunksize=_JSON_CHUNK)
    if builder == "csv":
        tsv = files[0].suffix.lower() == ".tsv"
        columns = list(fieldnames) if fieldnames is not None else _header(files[0], tsv, what)
        for f in files[1:]:
            if fieldnames is None and _header(f, tsv, what) != columns:
                raise ValueError(f"{what} {f}: its columns differ from those of {files[0]}")
        kwargs.update(
            features=ds.Features({c: ds.Value("string") for c in columns}),
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
        )
        if fieldnames is not None:
            kwargs.update(header=None, column_names=list(fieldnames))
        if tsv:
            kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    return builder, kwargs


def explain(error: Exception, files: Sequence[Path], what: str) -> ValueError:
    """The error to raise for ``files`` that failed to load with ``error``: the file and line at fault
    where a line-by-line look finds them (invalid UTF-8, a line that is not a JSON object, a row with
    the wrong number of fields), else the reader's reason."""
    if "corresponds to no data" in str(error):
        return ValueError(f"{what} {files[0]}: the file has no examples")
    cause: BaseException = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    try:
        for f in files:
            _diagnose(f, FILE_FORMATS.get(f.suffix.lower(), ""), what)
    except ValueError as found:
        return found
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(cause))
    if fields:
        expected, line, found_ = fields.groups()
        return ValueError(f"{what} {files[0]} line {line}: expected {expected} fields, found {found_}")
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return ValueError(f"{what} {', '.join(map(str, files))}: could not be read ({reason})")


def stream_table(path: str | os.PathLike[str], *, what: str = "data") -> tuple[Any, list[Path]]:
    """The rows of ``path`` as a ``datasets.IterableDataset`` read as it is iterated (nothing is
    converted first), and the files it reads (empty for a ``save_to_disk`` folder or a hub name;
    :func:`explain` turns a failure while iterating into a clear error)."""
    ds = _datasets()
    p = Path(path)
    if p.is_dir() and (p / "state.json").is_file():
        return _read_folder(p, what, None).to_iterable_dataset(), []
    if p.is_dir():
        files = _folder_files(p, what)
    elif p.is_file():
        files = [p]
    else:
        return _read_hub(str(path), what, streaming=True), []
    builder, kwargs = _builder_args(files, what, None)
    stream = ds.load_dataset(
        builder, data_files=[str(f) for f in files], split="train", streaming=True, **kwargs
    )
    return stream, files


def _check_readable(f: Path, what: str) -> None:
    """An empty file is refused; so is a JSONL file whose first line is not an object (the Arrow
    reader would take a list there for a column of values)."""
    if f.stat().st_size == 0:
        raise ValueError(f"{what} {f}: the file is empty")
    if f.suffix.lower() != ".jsonl":
        return
    with f.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                _check_line(raw, number, f, what)
                return


def _header(f: Path, tsv: bool, what: str) -> list[str]:
    """The first line's column names (the file's encoding checked on the way)."""
    with f.open("rb") as handle:
        first = _decode(handle.readline(), 1, f, what)
    if not first.strip():
        raise ValueError(f"{what} {f}: the first line is empty; expected a header line of column names")
    reader = (
        csv.reader(io.StringIO(first), delimiter="\t", quoting=csv.QUOTE_NONE)
        if tsv
        else csv.reader(io.StringIO(first))
    )
    columns = next(reader)
    if len(set(columns)) != len(columns):
        raise ValueError(f"{what} {f} line 1: repeated column names in the header {columns}")
    return columns


def _diagnose(f: Path, builder: str, what: str) -> None:
    """Raise the precise reason ``f`` failed to load, if a line-by-line look finds one."""
    if builder == "parquet":
        return
    jsonl = f.suffix.lower() == ".jsonl"
    with f.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if jsonl and raw.strip():
                _check_line(raw, number, f, what)
            else:
                _decode(raw, number, f, what)


def _decode(raw: bytes, number: int, f: Path, what: str) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {f} line {number}: not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from None


def _check_line(raw: bytes, number: int, f: Path, what: str) -> None:
    """One JSONL line: valid UTF-8, valid JSON, an object."""
    try:
        value = json.loads(_decode(raw, number, f, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {f} line {number}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {f} line {number}: expected a JSON object, got {type(value).__name__}")
