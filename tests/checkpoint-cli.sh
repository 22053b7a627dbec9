#!/usr/bin/env bash
# duplex train --save/--resume as a user runs them (DualPipe PP=2 x DP=2 x EP=2, EMA on, fp32 and fp64):
#  1. --steps 6 in one run and --steps 3 --save, then --resume --steps 6, end with identical shard checksums;
#  2. a process killed while saving (SIGKILL after the shards, before the manifest) leaves the previous checkpoint
#     loadable, resuming from it reaches the same step-6 checksums, and the killed run's JSON Lines metrics hold
#     every step it completed; a run killed at a random moment resumes too;
#  3. a checkpoint with a flipped byte, or one resumed with another PP, is refused (exit 2) naming the file;
#  4. --config FILE sets the same options ([train] section), the command line overriding it.
# usage: checkpoint-cli.sh DUPLEX_BINARY
set -euo pipefail
duplex=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
layout=(train --schedule dualpipe --pp 2 --dp 2 --ep 2 --microbatches 4 --ema-decay 0.9 --log-every 100)

checksums() {  # the manifest's files with their sizes and checksums, one per line
    python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); [print(f["file"], f["bytes"], f["checksum"]) for f in m["files"]]' "$1/manifest.json"
}
fail() { echo "FAIL: $*"; exit 1; }

for prec in "" --fp64; do
    rm -rf whole split
    "$duplex" "${layout[@]}" $prec --steps 6 --save whole >/dev/null
    "$duplex" "${layout[@]}" $prec --steps 3 --save split >/dev/null
    "$duplex" "${layout[@]}" $prec --steps 6 --resume split --save split | grep "resumed from" \
        || fail "no resume line"
    diff <(checksums whole/step-00000006) <(checksums split/step-00000006) \
        || fail "resumed ${prec:-fp32} run differs from the uninterrupted one"
    echo "ok: ${prec:-fp32} resume == uninterrupted ($(checksums whole/step-00000006 | wc -l) shards)"
done

# 2. Killed in the middle of the step-4 save.
rm -rf whole crash metrics.jsonl
"$duplex" "${layout[@]}" --steps 6 --save whole >/dev/null
set +e
DUPLEX_TEST_CRASH_BEFORE_MANIFEST=4 "$duplex" "${layout[@]}" --steps 6 --save crash --save-every 2 \
    --metrics metrics.jsonl >/dev/null 2>&1
rc=$?
set -e
[ "$rc" -eq 137 ] || fail "the crashing run exited $rc, not 137 (SIGKILL)"
[ -f crash/step-00000002/manifest.json ] || fail "the step-2 checkpoint is missing"
[ -f crash/step-00000004/rank-00000.bin ] && [ ! -f crash/step-00000004/manifest.json ] \
    || fail "the interrupted step-4 save should have shards and no manifest"
lines=$(wc -l <metrics.jsonl)
[ "$lines" -eq 4 ] || fail "metrics.jsonl has $lines lines; steps 1-4 completed"
python3 -c 'import json, sys; s = [json.loads(l)["step"] for l in open(sys.argv[1])]; assert s == [1, 2, 3, 4], s' metrics.jsonl
"$duplex" "${layout[@]}" --steps 6 --resume crash --save crash --metrics metrics.jsonl | grep "after step 2" \
    || fail "did not resume from step 2"
diff <(checksums whole/step-00000006) <(checksums crash/step-00000006) || fail "resume after the crash differs"
python3 -c 'import json, sys; s = [json.loads(l)["step"] for l in open(sys.argv[1])]; assert s == [1, 2, 3, 4, 3, 4, 5, 6], s' metrics.jsonl
echo "ok: killed mid-save at step 4, resumed from step 2, same step-6 shards; metrics kept"

# A kill at a moment nobody chose: checkpoints every step, SIGKILL after a while, then resume.
rm -rf random
"$duplex" "${layout[@]}" --steps 100000 --save random --save-every 1 --keep 2 >/dev/null 2>&1 &
pid=$!
for _ in $(seq 1 100); do [ -f random/step-00000003/manifest.json ] && break; sleep 0.1; done
sleep 0.$((RANDOM % 10))
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
last=$(ls random | sort | tail -1)
"$duplex" "${layout[@]}" --resume random --steps $(( 10#${last#step-} + 2 )) | grep "resumed from" \
    || fail "could not resume after a random kill (newest directory $last)"
echo "ok: killed at a random moment ($last newest), resumed"

# 3. Damage and another layout, refused naming the file.
cp -r whole/step-00000006 flipped
python3 - flipped/rank-00002.bin <<'EOF'
import sys
b = bytearray(open(sys.argv[1], "rb").read())
b[len(b) // 2] ^= 0x10
open(sys.argv[1], "wb").write(bytes(b))
EOF
set +e
err=$("$duplex" "${layout[@]}" --steps 8 --resume flipped 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" -eq 2 ] || fail "flipped byte: exit $rc"
grep -q "rank-00002.bin: checksum" <<<"$err" || fail "flipped byte: '$err'"
set +e
err=$("$duplex" train --schedule dualpipe --pp 4 --dp 2 --ep 2 --microbatches 8 --steps 8 --resume whole 2>&1 >/dev/null)
rc=$?
set -e
[ "$rc" -eq 2 ] || fail "another layout: exit $rc"
grep -q "manifest.json: written by a run with .*pp = 2" <<<"$err" || fail "another layout: '$err'"
echo "ok: a flipped byte and another layout are refused"

# 4. --config
printf '[train]\nschedule = "dualpipe"\npp = 2\ndp = 2\nep = 2\nmicrobatches = 4\nema-decay = 0.9\nsteps = 9\n' >run.toml
"$duplex" --config run.toml train --steps 6 --save fromconfig --log-every 100 >/dev/null
diff <(checksums whole/step-00000006) <(checksums fromconfig/step-00000006) || fail "--config run differs"
echo "ok: --config (with --steps overriding it) equals the command-line run"
