"""Checks and message helpers shared by the verbs and the file formats: a loaded adapter's tensors
against what the model expects, and a long list shortened for an error message."""

from __future__ import annotations

from collections.abc import Mapping

import torch


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
