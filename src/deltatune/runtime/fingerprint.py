"""Which base an adapter belongs on: the fingerprint :func:`deltatune.save` records.

For each adapted module, its class, its weight's shape and a cheap hash of its weight's content
(:func:`content_hash`); :func:`check_fingerprint` refuses a base that differs. A 4-bit module
(:class:`deltatune.runtime.quant.NF4Linear`) answers for the float module it was quantised from: its
``source_class`` and ``source_hash``, so that an adapter trained on a 4-bit base loads on the float
one and the other way round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn

from . import checks, wrapper

__all__ = ["CONTENT_SAMPLE", "check_fingerprint", "content_hash", "fingerprint"]


#: How many evenly spaced values of an adapted module's weight the fingerprint hashes.
CONTENT_SAMPLE = 64


def content_hash(weight: Any) -> str | None:
    """A cheap hash of a weight's content: :data:`CONTENT_SAMPLE` evenly spaced values of the
    flattened weight (flat positions ``i * (numel // k)``, ``k = min(64, numel)``), rounded to
    bfloat16 on the CPU and hashed as little-endian float32 bytes (SHA-256, first 16 hex digits).

    The same on every device; the same for a float64, float32 or bfloat16 copy of a base (a float16
    copy rounds differently and differs). None where there is no plain float weight to sample: a
    quantised weight (NF4: QPiSSA quantises a residual, not the base), a meta tensor, none at all.
    """
    return _content_hashes([_content_sample(weight)])[0]


def _content_sample(weight: Any) -> torch.Tensor | None:
    """The sampled values of :func:`content_hash`, on the weight's device (None: nothing to hash)."""
    if not isinstance(weight, torch.Tensor):
        return None
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    if type(data) is not torch.Tensor or not data.dtype.is_floating_point or data.device.type == "meta":
        return None
    n = data.numel()
    if n == 0:
        return None
    k = min(CONTENT_SAMPLE, n)
    with torch.no_grad():
        if data.is_contiguous():  # a strided view: no index tensor, no copy of the weight
            return data.detach().as_strided((k,), (n // k,)).to(torch.float32)
        flat = torch.arange(k, device=data.device) * (n // k)
        return data.detach()[torch.unravel_index(flat, data.shape)].to(torch.float32)


def _content_hashes(samples: list[torch.Tensor | None]) -> list[str | None]:
    """Hash samples all at once: one transfer per device, one rounding."""
    present = [s for s in samples if s is not None]
    if not present:
        return [None] * len(samples)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for each in present:
        by_device.setdefault(each.device, []).append(each)
    moved = {
        d: torch.cat(group).cpu().to(torch.bfloat16).to(torch.float32).numpy().astype("<f4").tobytes()
        for d, group in by_device.items()
    }
    offsets = dict.fromkeys(moved, 0)
    out: list[str | None] = []
    for sample in samples:
        if sample is None:
            out.append(None)
            continue
        start = offsets[sample.device]
        offsets[sample.device] = end = start + 4 * sample.numel()
        out.append(hashlib.sha256(moved[sample.device][start:end]).hexdigest()[:16])
    return out


def fingerprint(
    model: nn.Module, paths: list[str] | tuple[str, ...], *, content: Collection[str] = ()
) -> dict[str, list[Any]]:
    """path -> [class name, weight shape, content hash] of each module (seen through deltatune
    wrappers). The hash (:func:`content_hash`) is taken for the paths in ``content``, else None.

    The wrappers never change the base weight (PiSSA-family initialisers keep their frozen part
    beside it), so the hash is of the base the adapter was trained on."""
    modules = wrapper.base_modules(model, model.__dict__.get(wrapper.ATTACHMENT_ATTR))
    wanted = set(content)
    out: dict[str, list[Any]] = {}
    samples: dict[str, torch.Tensor | None] = {}
    for path in paths:
        module = modules.get(path)
        if module is None:
            out[path] = ["<missing>", [], None]
            continue
        weight = getattr(module, "weight", None)
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else []
        # A quantised module stands for the float one it was made from (deltatune.runtime.quant.NF4Linear).
        out[path] = [getattr(module, "source_class", None) or type(module).__name__, shape, None]
        if path in wanted:
            source = getattr(module, "source_hash", None)
            if isinstance(source, str):
                out[path][2] = source
            else:
                samples[path] = _content_sample(weight)
    for path, digest in zip(samples, _content_hashes(list(samples.values())), strict=True):
        out[path][2] = digest
    return out


def check_fingerprint(
    model: nn.Module, expected: Mapping[str, Any], where: str, *, strict_base: bool = True
) -> None:
    """Refuse a model whose adapted modules differ in class or weight shape from the fingerprint,
    or (``strict_base``) in content, where the file records a content hash (format-2 files saved
    before content hashes were recorded, and PEFT imports, have none)."""
    hashes = {
        p: e[2]
        for p, e in expected.items()
        if isinstance(e, list) and len(e) > 2 and isinstance(e[2], str) and strict_base
    }
    here = fingerprint(model, list(expected), content=hashes)
    bad = [
        f"{p}: adapter has {expected[p][0]}{tuple(expected[p][1])}, model has {here[p][0]}{tuple(here[p][1])}"
        for p in expected
        if [here[p][0], list(here[p][1])] != [expected[p][0], list(expected[p][1])]
    ]
    if bad:
        grown = [
            p
            for p in expected
            if here[p][0] == expected[p][0] in ("Embedding", "Linear")
            and len(here[p][1]) == len(expected[p][1]) == 2
            and here[p][1][1] == expected[p][1][1]
            and here[p][1][0] < expected[p][1][0]
        ]
        hint = (
            "; the adapter's vocabulary is larger (tokens added when it was trained, deltatune train "
            "--add-tokens): add the same tokens to the tokenizer, in order, and resize the embeddings "
            "first (model.resize_token_embeddings(len(tokenizer)))"
            if len(grown) == len(bad)
            else ""
        )
        raise ValueError(f"{where} was made for a different base model: {checks.few(bad, 4)}{hint}")
    differ = [p for p, h in hashes.items() if here[p][2] is not None and here[p][2] != h]
    if differ:
        raise ValueError(
            f"{where} was saved on another base model: the weights of {checks.few(differ, 4)} differ from "
            "the ones it was trained on (another checkpoint or fine-tune of the same architecture, or "
            "the base in float16). Load the base it was trained on, or pass strict_base=False "
            "(deltatune eval/merge --no-strict-base) to load it anyway"
        )
