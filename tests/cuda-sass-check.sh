#!/usr/bin/env bash
# Without a GPU: the exchange kernels' row copies and sums read and write with 128-bit instructions, and fit
# 1024 threads per block (registers) without stack in the sm_90a code that was built
# (LDG.E.128 and STG.E.128 in each of them), read with cuobjdump -sass. The CUDA toolkit on the CI machines lacks
# cuobjdump and nvdisasm; PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels carry them (installed into
# the project's .venv by scripts/install-python). Exit 77 (skipped) when neither is found.
# usage: cuda-sass-check.sh LIBDUPLEX_CUDA.so [PYTHON]
set -uo pipefail
lib=$(realpath "$1") py=${2:-python3}
dirs=(/usr/local/cuda/bin)
# The wheels put their tools under site-packages/nvidia/cuNN/bin.
while read -r d; do [ -n "$d" ] && dirs+=("$d"); done < <("$py" -c '
import glob, os, nvidia
for p in nvidia.__path__:
    print("\n".join(sorted(set(os.path.dirname(t) for t in glob.glob(os.path.join(p, "*", "bin", "cuobjdump"))))))
' 2>/dev/null)
for d in "${dirs[@]}"; do PATH=$PATH:$d; done
if ! command -v cuobjdump >/dev/null || ! command -v nvdisasm >/dev/null; then
    echo "cuobjdump and nvdisasm not found (PATH, ${dirs[*]}): skipped"
    exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && cuobjdump -xelf all "$lib" >/dev/null) || { echo "cuobjdump could not extract cubins from $lib"; exit 1; }
for f in "$work"/*.cubin; do cuobjdump -sass "$f"; done > "$work/all.sass" || { echo "cuobjdump -sass failed"; exit 1; }
cuobjdump --dump-resource-usage "$lib" > "$work/resources.txt" || { echo "cuobjdump --dump-resource-usage failed"; exit 1; }
"$py" - "$work/all.sass" "$work/resources.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
# Per function: registers and stack. The exchange kernels run 1024 threads per block: 64 registers at most (65536
# per SM), or the launch fails on the device; and no stack (spilled rows would crawl through local memory).
usage = {}
for name, body in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", open(sys.argv[2]).read()):
    usage[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", body)}
functions = {f.split("\n", 1)[0]: f for f in re.split(r"\n\s*Function : ", text)[1:]}
rc = 0
# kernel -> how many functions (template instances: reduce_hop_kernel<float>, <BF16 bits>)
for kernel, instances in (("exchange_kernel", 1), ("copy_hop_kernel", 1), ("reduce_hop_kernel", 2)):
    found = {name: body for name, body in functions.items() if re.search(rf"\d{kernel}[EI]", name)}
    if len(found) != instances:
        print(f"{kernel}: {len(found)} functions in the SASS, expected {instances}")
        rc = 1
        continue
    for name, body in found.items():
        loads, stores = len(re.findall(r"\bLDG\.E\.128\b", body)), len(re.findall(r"\bSTG\.E\.128\b", body))
        use = usage.get(name)
        print(f"{name}: {loads} LDG.E.128, {stores} STG.E.128, {use}")
        if loads == 0 or stores == 0:
            print(f"{name}: its copies are not 128-bit")
            rc = 1
        if use is None:
            print(f"{name}: no resource usage found")
            rc = 1
        elif use["REG"] * 1024 > 65536 or use.get("STACK", 0) or use.get("LOCAL", 0):
            print(f"{name}: does not fit 1024 threads per block without spilling ({use})")
            rc = 1
sys.exit(rc)
PY
