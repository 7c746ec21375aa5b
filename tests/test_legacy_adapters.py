"""Adapters saved by earlier deltatune releases keep loading, with the outputs they had.

tests/data/legacy/format-N/<method>/ holds one small adapter per registered method (and variant), as
the deltatune of that file format saved it (format 1: commit cf6e6eb; format 2: a later release;
format 3: issue 27's, with the ``extra`` section), with the toy's base weights, an input and the
adapted model's output (tests/data/legacy/make.py wrote them). A refactor of the save/load path
must keep every one of them loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from toy_models import TOYS

ROOT = Path(__file__).resolve().parent / "data" / "legacy"
CASES = sorted(p.parent for p in ROOT.glob("format-*/*/case.json"))


def test_each_format_holds_the_methods_of_its_time() -> None:
    """Format 1 (cf6e6eb) and format 2 hold one adapter per method registered when they were written
    (twelve cases: the nine methods and three of LoRA's initialiser variants); a method added later gets its
    case when the next file format is frozen (tests/data/legacy/make.py)."""
    for fmt in ("format-1", "format-2"):
        saved = {
            json.loads((c / "case.json").read_text())["method"].split("[")[0]
            for c in CASES
            if c.parent.name == fmt
        }
        assert len(saved) == 9 and saved <= set(dt.REGISTRY), f"{fmt}: {sorted(saved - set(dt.REGISTRY))}"


def test_format_3_holds_every_built_in_method() -> None:
    """Format 3 (issue 27: the ``extra`` section; written after the contract and folder refactor)
    holds one adapter per method deltatune ships, and its variants."""
    saved = {
        json.loads((c / "case.json").read_text())["method"].split("[")[0]
        for c in CASES
        if c.parent.name == "format-3"
    }
    shipped = {n for n, cls in dt.REGISTRY.items() if cls.__module__.startswith("deltatune.")}
    assert saved == shipped, sorted(saved ^ shipped)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}-{c.name}" for c in CASES])
def test_old_adapter_loads_with_its_outputs(case: Path) -> None:
    spec = json.loads((case / "case.json").read_text())
    toy = next(t for t in TOYS if t.name == spec["toy"])
    reference = load_file(str(case / "reference.safetensors"))
    model = toy.build()
    base = {k[len("base.") :]: v for k, v in reference.items() if k.startswith("base.")}
    model.load_state_dict(base, strict=True)  # the base weights the adapter was saved on
    dt.load(model, case)
    with torch.no_grad():
        out = model(reference["x"])
    assert torch.allclose(out, reference["y"], atol=1e-5, rtol=1e-5), spec
