#!/usr/bin/env bash
# `duplex commbench --svg`: a size sweep's picture has one bus-bandwidth line with a point per size of the run (the
# JSON's rows), the copy ceiling dashed (inproc), and for p2p a second chart of the time per message; under mpirun
# with --compare-mpi, Open MPI's line beside ours.
# usage: commbench-svg.sh DUPLEX [MPIRUN]
set -euo pipefail
duplex=$1 mpirun=${2:-}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$duplex" commbench --ranks 4 --op alltoall -b 1K -e 1M -f 4 -n 2 -w 1 --svg "$dir/a.svg" --json "$dir/a.json" \
    > /dev/null
"$duplex" commbench --ranks 2 --op p2p -b 8 -e 64K -f 8 -n 2 -w 1 --svg "$dir/p.svg" --json "$dir/p.json" > /dev/null
if [ -n "$mpirun" ]; then
    # Open MPI's dlopened components leak what LeakSanitizer cannot attribute: off for these processes (as the
    # mpirun suites do); no effect on an unsanitized build.
    "$mpirun" --allow-run-as-root --oversubscribe -np 2 -x DUPLEX_STORE_ADDR=127.0.0.1:29699 \
        -x ASAN_OPTIONS=detect_leaks=0 "$duplex" commbench \
        --backend mpi --op p2p -b 8 -e 4K -f 8 -n 2 -w 1 --compare-mpi --svg "$dir/m.svg" > /dev/null
fi
python3 - "$dir" "${mpirun:+mpi}" <<'PY'
import json, re, sys
d, mpi = sys.argv[1], sys.argv[2] == "mpi"
def check(name, charts):
    svg = open(f"{d}/{name}.svg").read()
    rows = json.load(open(f"{d}/{name}.json"))["rows"] if name != "m" else None
    lines = re.findall(r'<polyline class="series" points="([^"]*)"[^>]*>(?:<title>([^<]*)</title>)?', svg)
    titles = [t for _, t in lines]
    if rows is not None:
        first = lines[0][0].split()
        assert len(first) == len(rows), f"{name}: {len(first)} points for {len(rows)} sizes"
    assert svg.count("bus bandwidth (GB/s)") == 1, name
    assert svg.count("time per message") == (1 if charts == 2 else 0), name
    return titles, svg
titles, svg = check("a", 1)
assert any("copy ceiling" in t for t in titles) and 'stroke-dasharray="6,4"' in svg, titles
for size in ["1K", "4K", "16K", "64K", "256K", "1M"]:
    assert f">{size}</text>" in svg, size
titles, _ = check("p", 2)
if mpi:
    titles, _ = check("m", 2)
    assert sum("Open MPI" in t for t in titles) == 2, titles
print("commbench svg: a point per size, the ceiling dashed, p2p's latency chart" + (", Open MPI's lines" if mpi else ""))
PY
