"""Checks and message helpers shared by the verbs and the file formats: a loaded adapter's tensors
against what the model expects and against the sizes its config promises, and a long list
shortened for an error message."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from ..contract import config_for, hooks


def check_state(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise naming every missing, extra and mis-shaped tensor, and every tensor holding NaN or ±inf
    (an adapter with a non-finite value makes every output it touches non-finite)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {few(missing)}")
    if extra:
        problems.append(f"unexpected tensors {few(extra)}")
    if shapes:
        problems.append(f"mismatched shapes {few(shapes)}")
    non_finite = sorted(_non_finite(k, t) for k, t in found.items() if not _all_finite(t))
    if non_finite:
        problems.append(f"non-finite values (expected finite numbers) in tensors {few(non_finite)}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def _all_finite(t: torch.Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
        return True
    return bool(torch.isfinite(t).all())


def _non_finite(key: str, t: torch.Tensor) -> str:
    """``key (3 NaN, 1 inf of 64 values)``."""
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{key} ({nan} NaN, {inf} inf of {t.numel()} values)"


def few(items: list[str], n: int = 6) -> str:
    """A list shortened for an error message: the first ``n`` items and the count."""
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)} in all)"


#: A config whose sizes no field explains is refused before the build only when it needs more than
#: this many times the bytes the file holds; below that, the key check after the (small) build names
#: the missing, extra or mis-shaped tensor exactly.
OVERSIZE = 4


def check_sizes(
    method: Any,
    bases: Mapping[str, nn.Module],
    overrides: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, torch.Tensor],
    where: str,
    *,
    shared_key: str,
    skip: Collection[str] = (),
) -> None:
    """Refuse a file whose tensors are not the sizes its config promises, before anything is built.

    An adapter's config decides what :func:`deltatune.inject` allocates (``rank: 5000000`` is
    gigabytes per module); the file's tensors are what it really holds. Each method's closed form
    (``stored_bytes`` per module with its ``overrides``, ``shared_stored_bytes`` for the shared state
    under ``shared_key``) must equal the bytes of the tensors stored under that module, either as
    stored or with floating tensors counted at the adapter dtype the base gives (float32; float64
    on a float64 base), so that a file saved from a cast model still loads. Tensors under ``skip``
    (full copies of ``modules_to_save``) and under no module are left to the key check that follows
    the build.

    A mismatch that one integer field of the config explains (``rank`` 8 where the tensors hold 4) is
    refused naming the field; any other mismatch is refused when the config needs more than
    :data:`OVERSIZE` times what the file holds, and otherwise left to the key and shape check after
    the build, which names the tensor (a tensor missing or extra, an adapter for another model).

    Raises:
        ValueError: naming each module that disagrees, the config field that decides it and the
            value the file's tensors hold where one field explains it, and both sizes.
    """
    owners = [*bases, shared_key, *skip]
    groups: dict[str, dict[str, torch.Tensor]] = {o: {} for o in owners}
    for key, t in tensors.items():
        owner = max((o for o in owners if key.startswith(o + ".")), key=len, default=None)
        if owner is not None:
            groups[owner][key[len(owner) + 1 :]] = t
    widths = {p: torch.promote_types(_weight_dtype(b), torch.float32).itemsize for p, b in bases.items()}
    width = next(iter(widths.values()), 4)
    try:
        need = {p: config_for(method, p, overrides).stored_bytes(b) for p, b in bases.items()}
        need[shared_key] = hooks(method).shared_stored_bytes(bases)
    except (ValueError, TypeError, ArithmeticError):
        return  # a config that does not fit these modules: inject names what is wrong
    held = {o: (_bytes(groups[o].values()), _bytes(groups[o].values(), widths.get(o, width))) for o in need}
    total = sum(need.values())
    stored = (sum(h for h, _ in held.values()), sum(h for _, h in held.values()))
    if total in stored:
        return
    problems, explained = [], False
    for owner, n in need.items():
        if n in held[owner]:
            continue
        dims = {d for t in groups[owner].values() for d in t.shape}
        if owner == shared_key:
            found = _field_for(method, partial(_shared_bytes, bases=bases), held[owner], dims)
        else:
            cfg = config_for(method, owner, overrides)
            found = _field_for(cfg, partial(_module_bytes, base=bases[owner]), held[owner], dims)
        shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in groups[owner].items()) or "nothing"
        field = f" with {found[0]}={found[1]}" if found else ""
        holds = f": it holds {found[0]}={found[2]}" if found else ""
        problems.append(
            f"{owner!r} needs {n:,} bytes{field}, the file holds {held[owner][0]:,} ({shapes}){holds}"
        )
        explained = explained or found is not None
    if not explained and total <= OVERSIZE * max(stored):
        return  # (a tensor missing, extra or of another shape: the build is small, the key check names it)
    raise ValueError(
        f"{where}: the sizes the config gives on this model do not match the stored tensors, so nothing "
        f"was built: {few(problems, 4)}; was the config edited or copied from another save, or is the "
        "adapter for another model?"
    )


def _weight_dtype(base: nn.Module) -> torch.dtype:
    weight = getattr(base, "weight", None)
    ok = isinstance(weight, torch.Tensor) and weight.is_floating_point()
    return weight.dtype if ok else torch.float32  # type: ignore[union-attr]


def _module_bytes(cfg: Any, base: nn.Module) -> int:
    return int(cfg.stored_bytes(base))


def _shared_bytes(method: Any, bases: Mapping[str, nn.Module]) -> int:
    return int(hooks(method).shared_stored_bytes(bases))


def _bytes(tensors: Iterable[torch.Tensor], float_width: int | None = None) -> int:
    """The bytes of ``tensors``, floating ones counted at ``float_width`` bytes a value if given."""
    return sum(
        t.numel() * (float_width if float_width and t.is_floating_point() else t.element_size())
        for t in tensors
    )


def _field_for(
    cfg: Any, size: Callable[[Any], int], held: tuple[int, int], dims: set[int]
) -> tuple[str, Any, int] | None:
    """(field, its value, the value the file holds) where setting one integer field of ``cfg`` to a
    dimension of the stored tensors gives the stored size; None where none does."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if type(value) is not int:
            continue
        for candidate in sorted(dims - {value})[:64]:
            try:
                if size(dataclasses.replace(cfg, **{f.name: candidate})) in held:
                    return f.name, value, candidate
            except (ValueError, TypeError, ArithmeticError):
                continue
    return None
