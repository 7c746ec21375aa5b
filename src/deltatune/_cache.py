"""A value cached from tensors, valid while every one of them is unchanged.

A tensor counts as unchanged while it has the same storage (``data_ptr``), version counter (in-place
writes: an optimizer step, ``copy_``), dtype, device, shape and strides. ``p.data = ...`` (as
``torch.nn.utils.vector_to_parameters`` and ``module.half()`` / ``.to(device)`` do) gives a
parameter new storage without touching its version counter: the storage address catches it. The
entry holds the old tensors' storage, so that the allocator cannot hand the same address to their
replacement while the entry lives. Code traced by ``torch.compile`` neither reads nor fills the
cache (it recomputes the value inside the graph): data pointers cannot be guarded on.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3))
    >>> memo = Memo()
    >>> memo.get(p) is None
    True
    >>> memo.put(2 * p.detach(), p).sum().item()
    6.0
    >>> memo.get(p) is not None
    True
    >>> p.data = torch.zeros(3)
    >>> memo.get(p) is None
    True
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


def signature(*tensors: torch.Tensor | None) -> tuple[Any, ...]:
    """Everything a value computed from ``tensors`` depends on, short of their contents."""
    return tuple(
        None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), t.stride())
        for t in tensors
    )


class Memo(Generic[T]):
    """One cached value and the :func:`signature` of the tensors it was computed from."""

    def __init__(self) -> None:
        self._entry: tuple[tuple[Any, ...], tuple[torch.Tensor, ...], T, bool] | None = None

    def get(self, *sources: torch.Tensor | None) -> T | None:
        """The value, if it was put with these very tensors, unchanged since; else None.

        A value put under ``torch.inference_mode`` is only returned under it: autograd refuses
        inference tensors, so a training forward after an inference one computes afresh.
        """
        if torch.compiler.is_compiling():  # traced code recomputes: no data-pointer guards
            return None
        if self._entry is None or self._entry[0] != signature(*sources):
            return None
        if self._entry[3] and not torch.is_inference_mode_enabled():
            return None
        return self._entry[2]

    def put(self, value: T, *sources: torch.Tensor | None) -> T:
        if torch.compiler.is_compiling():
            return value
        held = tuple(t.detach() for t in sources if t is not None)  # (keeps their storage alive)
        self._entry = (signature(*sources), held, value, torch.is_inference_mode_enabled())
        return value

    def clear(self) -> None:
        self._entry = None
