"""safetensors files read from their bytes: every tensor, each entry of the header checked first.

The format (https://github.com/huggingface/safetensors#format): 8 bytes, the little-endian length
``n`` of a JSON header; the header, ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` plus
an optional ``"__metadata__"``; then the data, offsets counted from the end of the header. Reading
from bytes (not a path) is what lets :func:`deltatune.formats.files.read_folder` hand over the files of one
version of a folder; the tensors share one writable buffer with no further copy. Nothing is
unpickled: the header is JSON and the data raw numbers.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

#: safetensors' dtype names -> torch dtypes (those this torch has).
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "C64": "complex64",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
    }.items()
    if hasattr(torch, attr)
}


Entry = tuple[torch.dtype, list[int], int, int]  # dtype, shape, first byte, end byte


def _entries(data: bytes | bytearray, where: Any) -> tuple[int, dict[str, Entry]]:
    """(where the data starts, name -> (dtype, shape, begin, end)), every entry checked against the
    file's length; a ``ValueError`` naming ``where`` otherwise."""

    def bad(why: str) -> ValueError:
        return ValueError(f"{where} is not a readable safetensors file (truncated or corrupted?): {why}")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise bad(f"the header claims {n:,} bytes; the file has {len(data) - 8:,} after the length")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    start, size = 8 + n, len(data) - 8 - n
    out: dict[str, Entry] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, Mapping):
            raise bad(f"entry {name!r} is not an object")
        dtype = DTYPES.get(str(entry.get("dtype")))
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None:
            raise bad(f"tensor {name!r} has dtype {entry.get('dtype')!r}; known: {sorted(DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}")
        begin, end = offsets
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= size or end - begin != math.prod(shape) * itemsize:
            raise bad(
                f"tensor {name!r} ({entry.get('dtype')} {shape}) spans bytes {begin}..{end} of {size:,}"
            )
        out[name] = (dtype, shape, begin, end)
    return start, out


def tensors(data: bytearray, where: Any) -> dict[str, torch.Tensor]:
    """name -> each stored tensor (CPU), viewing ``data`` (kept alive by them; writable)."""
    start, entries = _entries(data, where)
    out: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if end == begin:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=start + begin)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (start + begin) % itemsize:  # (a file whose header is not padded: an aligned copy)
            raw = raw.clone()
        tensor = raw.view(dtype).reshape(shape)
        if sys.byteorder == "big":  # (the file is little-endian)
            swapped = tensor.view(torch.uint8).reshape(-1, itemsize).flip(1).reshape(-1)
            tensor = swapped.view(dtype).reshape(shape)
        out[name] = tensor
    return out
