#!/usr/bin/env bash
# Regenerate a committed constraints file from a fresh install (then run `bash .ci/run`):
#
#   bash scripts/lock.sh lock      constraints/lock.txt: today's newest releases of every dependency
#   bash scripts/lock.sh minimum   constraints/minimum.txt: every direct dependency at the lower bound
#                                  pyproject.toml declares (torch excepted: TORCH_SPEC), the rest
#                                  resolved by pip around them
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:?usage: bash scripts/lock.sh lock|minimum}"
venv="$(mktemp -d)/venv"
case "$kind" in
lock) constraints="" ;;
minimum)
    constraints="$(mktemp)"
    python3 scripts/lower_bounds.py >"$constraints"
    ;;
*)
    echo "lock.sh: expected lock or minimum, got $kind" >&2
    exit 2
    ;;
esac
VENV="$venv" CONSTRAINTS="$constraints" bash scripts/setup.sh
out="constraints/$kind.txt"
{
    echo "# Exact versions for scripts/setup.sh (CONSTRAINTS=$out); made by \`bash scripts/lock.sh $kind\`"
    echo "# on $(date -u +%Y-%m-%d) with $("$venv/bin/python" --version)."
    "$venv/bin/python" -m pip freeze --all --exclude-editable 2>/dev/null | grep -v "^deltatune\b" | sed 's/+cpu$//'
} >"$out"
rm -rf "$(dirname "$venv")"
echo "wrote $out"
