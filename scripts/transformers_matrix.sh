#!/usr/bin/env bash
# Run the tests that depend most on transformers' internals (prompt, prefix and P-tuning: masks,
# positions, the KV cache, generate(); the harness's model loading) on several transformers releases,
# one after another in one scratch venv (everything else from constraints/minimum.txt's resolution).
#
#   bash scripts/transformers_matrix.sh 5.0.0 5.5.4 5.12.1 5.18.0 5.22.2 5.24.0
#
# The lock and minimum runs of .ci/run cover the two ends on every CI run; this covers the middle
# (about 30 s per release on 2 cores, after the first install).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$#" -gt 0 ] || { echo "usage: bash scripts/transformers_matrix.sh VERSION [VERSION ...]" >&2; exit 2; }
venv="${MATRIX_VENV:-.venv-matrix}"
[ -x "$venv/bin/python" ] || VENV="$venv" CONSTRAINTS=constraints/minimum.txt bash scripts/setup.sh >/dev/null
tests=(tests/test_prompts.py tests/test_generation.py tests/test_anatomy.py "tests/test_invariants.py")
results=()
for version in "$@"; do
    "$venv/bin/python" -m pip install --quiet "transformers==$version" 2>&1 | grep -v "^WARNING: Location" || true
    log="$(mktemp)"
    if "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" >"$log" 2>&1; then status=pass; else status=FAIL; fi
    results+=("transformers $version: $status  $(grep -E "[0-9]+ (passed|failed)" "$log" | tail -1)")
    [ "$status" = pass ] || grep -E "^(FAILED|ERROR) " "$log" | head -10
done
printf '%s\n' "${results[@]}"
