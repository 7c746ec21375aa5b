"""Every example in the library's docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import deltatune

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(deltatune.__path__, prefix="deltatune.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", ["deltatune", *MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_examples_exist_where_they_matter() -> None:
    for name in ("deltatune.core", "deltatune.io", "deltatune.targets", "deltatune.methods.lora"):
        finder = doctest.DocTestFinder()
        examples = sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
        assert examples > 0, f"{name} has no runnable example"
