#!/usr/bin/env bash
# A few KB of token ids (u16, byte-level "text" with structure to learn) train the tiny model through
# `duplex train --data FILE` on a DualPipe layout and on one rank: the loss must fall below 80% of its start.
# usage: token-file-trains.sh DUPLEX
set -euo pipefail
duplex=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 - "$dir/ids.bin" <<'PY'
import struct, sys
# Sentences over a 64-symbol alphabet: each word is followed by a fixed successor most of the time.
words = [[(7 * w + 3 * i) % 60 + 2 for i in range(3 + w % 3)] for w in range(12)]
ids, w, x = [], 0, 12345
for _ in range(900):
    ids += words[w] + [1]
    x = (1103515245 * x + 12345) % 2**31
    w = (w + 1) % 12 if x % 10 < 8 else x % 12
open(sys.argv[1], "wb").write(struct.pack(f"<{len(ids)}H", *ids))
print(f"{len(ids)} ids, {2*len(ids)} bytes", file=sys.stderr)
PY
for layout in "--ranks 1" "--schedule dualpipe --pp 2 --dp 2 --microbatches 4"; do
    $duplex train $layout --data "$dir/ids.bin:u16" --steps 60 --lr 1e-2 --log-every 1000 --json "$dir/m.json" >/dev/null
    python3 - "$dir/m.json" "$layout" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["steps"]
first, last = s[0]["loss"], s[-1]["loss"]
print(f"{sys.argv[2]}: loss {first:.3f} -> {last:.3f}")
sys.exit(0 if last < 0.8 * first else 1)
PY
done
