#!/usr/bin/env bash
# `cmake --install` into a fresh prefix, then examples/custom_stage — copied out of the tree, so nothing but the
# installed package can be found — configured with find_package(Duplex), built and run: its DualPipe x ZeRO-1
# run must equal its single-rank run. Also checks that no compile command of the example names the source tree.
# usage: install-example.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$(cd "$1" && pwd) src=$(cd "$2" && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cmake --install "$build" --prefix "$dir/prefix" >/dev/null
cp -r "$src/examples/custom_stage" "$dir/example"
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S "$dir/example" -B "$dir/build" "${gen[@]}" -DCMAKE_PREFIX_PATH="$dir/prefix" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_EXPORT_COMPILE_COMMANDS=ON >/dev/null
if grep -q -- "-I$src\b\|-isystem $src\b" "$dir/build/compile_commands.json"; then
    echo "install-example: the example's compile commands name the source tree"; exit 1
fi
cmake --build "$dir/build" >/dev/null
"$dir/build/custom_stage" --schedule dualpipe --steps 10
"$dir/build/custom_stage" --schedule dualpipev --steps 3 | tail -1
