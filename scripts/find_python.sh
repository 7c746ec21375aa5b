#!/usr/bin/env bash
# Print the path of a Python interpreter of the version asked for (e.g. 3.10), one that runs:
#   python3.10 on the PATH, else pyenv's newest 3.10.x, else /usr/bin or /usr/local/bin. Exit 1 if none.
# (A pyenv shim is on the PATH for every installed version but runs only the selected ones.)
set -uo pipefail
want="${1:?usage: bash scripts/find_python.sh 3.10}"
candidates=("python$want")
if command -v pyenv >/dev/null 2>&1; then
    root="$(pyenv root)"
    while read -r v; do
        candidates+=("$root/versions/$v/bin/python")
    done < <(pyenv versions --bare 2>/dev/null | grep -E "^$want(\.[0-9]+)?$" | sort -t. -k3 -n -r)
fi
candidates+=("/usr/local/bin/python$want" "/usr/bin/python$want")
for c in "${candidates[@]}"; do
    if got="$("$c" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null)" &&
        [ "$got" = "$want" ]; then
        command -v "$c"
        exit 0
    fi
done
echo "find_python.sh: no working Python $want here" >&2
exit 1
