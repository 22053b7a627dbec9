#!/usr/bin/env bash
# `duplex commbench --op pairs` finds the one slow link: 8 ranks over 2 virtual nodes, the send from rank 2 to
# rank 5 delayed 200 ms per message by the test knob DUPLEX_TEST_SLOW_PAIR (100x the median counts as slow: 8
# oversubscribed processes on a CI machine jitter by tens); the report (text, JSON) must name 2->5
# for bandwidth (and at most the pair 2<->5 for latency, a round trip) and nothing else, and the heatmap must hold one cell
# per ordered pair with exactly that one outlined.
# With REPEAT set (inproc), every pair is measured REPEAT times, 4 messages each, and the cells are their medians.
# usage: [REPEAT=N] commbench-pairs.sh DUPLEX [BACKEND [MPIRUN PORT]]   (mpi and ucx run 8 processes under MPIRUN)
set -euo pipefail
duplex=$1 backend=${2:-inproc} mpirun=${3:-} port=${4:-29690} repeat=${REPEAT:-1}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
iters=(-n 10 -w 2)
[ "$repeat" -gt 1 ] && iters=(-n 4 -w 1 --repeat "$repeat")
args=(commbench --op pairs --virtual-nodes 2 --slow-factor 100 "${iters[@]}" --json "$dir/pairs.json" --svg "$dir/pairs.svg")
export DUPLEX_TEST_SLOW_PAIR=2:5:200000
if [ "$backend" = inproc ]; then
    "$duplex" "${args[@]}" --ranks 8 > "$dir/out.txt" || true   # exit 1: a slow pair was found
else
    "$mpirun" --allow-run-as-root --oversubscribe -np 8 -x DUPLEX_TEST_SLOW_PAIR \
        -x DUPLEX_STORE_ADDR=127.0.0.1:$port -x DUPLEX_COMM_TIMEOUT=120 -x ASAN_OPTIONS=detect_leaks=0 \
        "$duplex" "${args[@]}" --backend "$backend" > "$dir/out.txt" || true
fi
python3 - "$dir" "$repeat" <<'PY'
import json, re, sys
d = sys.argv[1]
r = json.load(open(f"{d}/pairs.json"))
assert r["repeat"] == int(sys.argv[2]), r["repeat"]
slow = sorted((s["from"], s["to"], s["what"]) for s in r["slow"])
# The bandwidth names 2->5; the latency (a round trip under oversubscribed processes whose median may be
# milliseconds) names 2<->5 or, when the median is that slow, nothing; no other pair either way.
assert (2, 5, "bandwidth") in slow and all((f, t) == (2, 5) for f, t, _ in slow), f"slow pairs {slow}, expected 2->5"
assert r["node_of"] == [0, 0, 0, 0, 1, 1, 1, 1], r["node_of"]
text = open(f"{d}/out.txt").read()
assert re.search(r"SLOW 2->5 \(node 0 -> node 1\): bandwidth", text), text
assert len(re.findall(r"^# SLOW", text, re.M)) == len(slow), text
svg = open(f"{d}/pairs.svg").read()
cells = re.findall(r'<rect class="pair"[^>]*>', svg)
assert len(cells) == 56, len(cells)
outlined = [c for c in cells if 'stroke="#d62728"' in c]
assert len(outlined) == 1, len(outlined)
assert "<title>2 -> 5:" in svg.split(outlined[0])[1][:80], "the outlined cell is not 2 -> 5"
print(f"commbench pairs: 2->5 named alone (median {r['median_bandwidth_gbs']:.2f} GB/s, "
      f"2->5 {r['bandwidth_gbs'][2][5]:.3f} GB/s); 56 cells, one outlined")
PY
