#!/usr/bin/env bash
# `pip install .` into a fresh virtual environment (build isolation: scikit-build-core and nanobind from PyPI),
# then the acceptance one-liner: the DualPipe plan of PP=8, N=20 with F&B=3 has makespan 66.
# Given the tree `make test` just built (its compilers, build type, CUDA setting and nanobind), every source
# compiles with the same command line, so a compiler cache (ccache, when installed) serves them instead of compiling them
# again.
# usage: pip-install.sh SOURCE_DIR [BUILD_DIR WITH_CUDA]
set -euo pipefail
src=$(cd "$1" && pwd)
same=()
if [ $# -ge 3 ]; then
    cached() { sed -n "s/^$1:[A-Z]*=//p" "$2/CMakeCache.txt"; }
    same=(--config-settings=cmake.build-type="$(cached CMAKE_BUILD_TYPE "$2")"
          --config-settings=cmake.define.CMAKE_CXX_COMPILER="$(cached CMAKE_CXX_COMPILER "$2")"
          --config-settings=cmake.define.CMAKE_C_COMPILER="$(cached CMAKE_C_COMPILER "$2")"
          --config-settings=cmake.define.DUPLEX_WITH_CUDA="$3")
    # The nanobind sources the tree was built with (from PyPI too, in the project's .venv), so the module's
    # objects come from the cache as well; the isolated build environment still installs its own nanobind.
    nb=$(cached nanobind_DIR "$2")
    [ -n "$nb" ] && same+=(--config-settings=cmake.define.nanobind_DIR="$nb")
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 -m venv "$dir/venv"
"$dir/venv/bin/python" -m pip install -q --disable-pip-version-check "$src" \
    --config-settings=build-dir="$dir/build" "${same[@]}" >"$dir/pip.log" 2>&1 || { grep -E "error|Error" "$dir/pip.log" | tail -20; exit 1; }
cd "$dir"
got=$("$dir/venv/bin/python" -c "import duplex; print(duplex.schedule('dualpipe', pp=8, microbatches=20, cost_f=1, cost_b=2, cost_w=1, cost_fb=3).makespan)")
echo "$got"
[ "$got" = 66 ] || { echo "the one-liner printed '$got', not 66" >&2; exit 1; }
# duplex.commbench: the bus bandwidth of a 1 MiB all-to-all on 4 in-process ranks, a positive number.
bw=$("$dir/venv/bin/python" -c "import duplex; print(duplex.commbench(op='alltoall', ranks=4, sizes=[1<<20])[0]['busbw_gbs'])")
echo "commbench busbw $bw GB/s"
python3 -c "import sys; sys.exit(0 if float('$bw') > 0 else 1)" || { echo "commbench printed '$bw'" >&2; exit 1; }
"$dir/venv/bin/python" -c "import duplex, os; print('installed at', os.path.dirname(duplex.__file__)); print(sorted(os.listdir(os.path.dirname(duplex.__file__))))"
