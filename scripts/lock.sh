#!/usr/bin/env bash
# Regenerate a committed constraints file from fresh installs (then run `bash .ci/run`):
#
#   bash scripts/lock.sh lock      constraints/lock.txt: today's newest releases of every dependency
#   bash scripts/lock.sh minimum   constraints/minimum.txt: every direct dependency at the lower bound
#                                  pyproject.toml declares (torch excepted: TORCH_SPEC), the rest
#                                  resolved by pip around them
#
# One file serves every Python the project declares (>= 3.10). The main Python (PYTHON, default
# python3) gives the pins; the lowest one (LOWEST_PYTHON, default python3.10) installs with them,
# except for the releases that do not support it, which it resolves for itself; those get a line per
# Python with a python_version marker (scripts/merge_locks.py). Newer Pythons take the main pins
# (CI installs and tests the lowest and the highest: .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:?usage: bash scripts/lock.sh lock|minimum}"
MAIN_PYTHON="${PYTHON:-python3}"
LOWEST_PYTHON="${LOWEST_PYTHON:-python3.10}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
case "$kind" in
lock) : >"$work/start.txt" ;;
minimum) python3 scripts/lower_bounds.py >"$work/start.txt" ;;
*)
    echo "lock.sh: expected lock or minimum, got $kind" >&2
    exit 2
    ;;
esac

# freeze PYTHON CONSTRAINTS OUT: a fresh venv of PYTHON installed by setup.sh, its pins in OUT.
freeze() {
    PYTHON="$1" VENV="$work/venv" CONSTRAINTS="$2" bash scripts/setup.sh
    "$work/venv/bin/python" -m pip freeze --all --exclude-editable 2>/dev/null |
        grep -v -E "^(deltatune|nvidia-|cuda-|triton)\b" | sed 's/+cpu$//' >"$3"
    rm -rf "$work/venv"
}
version() { "$1" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'; }

freeze "$MAIN_PYTHON" "$work/start.txt" "$work/main.txt"
main_py="$(version "$MAIN_PYTHON")"
specs=("$main_py=$work/main.txt")
if lowest="$(bash scripts/find_python.sh "${LOWEST_PYTHON#python}")"; then
    LOWEST_PYTHON="$lowest"
    low_py="$(version "$LOWEST_PYTHON")"
    # What the lowest Python resolves for itself, then the main pins minus those it cannot take.
    freeze "$LOWEST_PYTHON" "$work/start.txt" "$work/low-free.txt"
    python3 - "$work/main.txt" "$work/low-free.txt" >"$work/low-start.txt" <<'EOF'
import re
import sys

def pins(path):
    return dict(line.strip().split("==", 1) for line in open(path) if "==" in line)

def key(v):
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.+]", v))

main, low = pins(sys.argv[1]), pins(sys.argv[2])
for name, version in main.items():
    if name not in low or key(low[name]) >= key(version):
        print(f"{name}=={version}")
EOF
    freeze "$LOWEST_PYTHON" "$work/low-start.txt" "$work/low.txt"
    specs+=("$low_py=$work/low.txt")
else
    echo "lock.sh: $LOWEST_PYTHON not found: the file pins for Python $main_py only" >&2
fi
out="constraints/$kind.txt"
header="# Exact versions for scripts/setup.sh (CONSTRAINTS=$out); made by \`bash scripts/lock.sh $kind\`
# on $(date -u +%Y-%m-%d) with Python $main_py${low_py:+ and $low_py (its own lines: python_version == \"$low_py\")}."
python3 scripts/merge_locks.py "$header" "${specs[@]}" >"$out"
echo "wrote $out"
