#!/usr/bin/env bash
# `pip install .` into a fresh virtual environment (build isolation: scikit-build-core and nanobind from PyPI),
# then the acceptance one-liner: the DualPipe plan of PP=8, N=20 with F&B=3 has makespan 66.
# usage: pip-install.sh SOURCE_DIR
set -euo pipefail
src=$(cd "$1" && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 -m venv "$dir/venv"
"$dir/venv/bin/python" -m pip install -q --disable-pip-version-check "$src" \
    --config-settings=build-dir="$dir/build" >"$dir/pip.log" 2>&1 || { grep -E "error|Error" "$dir/pip.log" | tail -20; exit 1; }
cd "$dir"
got=$("$dir/venv/bin/python" -c "import duplex; print(duplex.schedule('dualpipe', pp=8, microbatches=20, cost_f=1, cost_b=2, cost_w=1, cost_fb=3).makespan)")
echo "$got"
[ "$got" = 66 ] || { echo "the one-liner printed '$got', not 66" >&2; exit 1; }
"$dir/venv/bin/python" -c "import duplex, os; print('installed at', os.path.dirname(duplex.__file__)); print(sorted(os.listdir(os.path.dirname(duplex.__file__))))"
