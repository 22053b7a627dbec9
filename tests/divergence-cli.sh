#!/usr/bin/env bash
# duplex train on a run that diverges (a planted learning rate of 1e6): the steps whose loss or gradient norm is
# not finite are reported (not applied, where it started), the run stops after --max-bad-steps of them in a row
# with exit code 4, the last checkpoint is the one before (no bad step saved), and it resumes from exactly there.
# usage: divergence-cli.sh DUPLEX_BINARY
set -euo pipefail
duplex=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
fail() { echo "FAIL: $*"; exit 1; }
layout=(train --pp 2 --microbatches 4 --log-every 100)

set +e
"$duplex" "${layout[@]}" --lr 1e6 --steps 10 --save run --save-every 1 --max-bad-steps 2 --metrics steps.jsonl \
    >out.txt 2>err.txt
rc=$?
set -e
[ "$rc" = 4 ] || { cat out.txt err.txt; fail "exit code $rc, expected 4 (diverged)"; }
grep -q "not applied: loss" err.txt || fail "no per-step report"
grep -q "first non-finite gradient (backward order): stage" err.txt || fail "the report names no stage"
grep -q "diverged: stopped after 2 step(s) in a row" err.txt || fail "no stop message"
grep -q '"applied":false' steps.jsonl || fail "the metrics do not mark the step not applied"
applied=$(grep -c '"applied":true' steps.jsonl)
last=$(ls run | sort | tail -1)
[ "$last" = "$(printf 'step-%08d' "$applied")" ] || fail "last checkpoint $last, expected the last applied step $applied"
[ "$(ls run | wc -l)" = "$applied" ] || fail "a bad step was checkpointed: $(ls run | tr '\n' ' ')"
echo "ok: stopped with exit 4 after $applied applied step(s); last checkpoint $last"

# The checkpoint is the state before the first bad step, exactly: resumed (with the same rate), that step's loss is
# the diverged run's bit for bit.
next=$((applied + 1))
"$duplex" "${layout[@]}" --lr 1e6 --steps $next --resume run --metrics resumed.jsonl >out2.txt 2>err2.txt \
    || { cat out2.txt err2.txt; fail "resuming from $last failed"; }
grep -q "resumed from run/$last" out2.txt || fail "no resume line"
loss_of() { python3 -c 'import json, sys; print([json.loads(l)["loss"] for l in open(sys.argv[1]) if json.loads(l)["step"] == int(sys.argv[2])][0])' "$1" "$2"; }
[ "$(loss_of steps.jsonl $next)" = "$(loss_of resumed.jsonl $next)" ] \
    || fail "step $next after resuming: loss $(loss_of resumed.jsonl $next), the diverged run had $(loss_of steps.jsonl $next)"
echo "ok: resumed from $last; step $next's loss equals the diverged run's ($(loss_of resumed.jsonl $next))"

set +e
"$duplex" "${layout[@]}" --max-bad-steps -1 --steps 1 >/dev/null 2>err3.txt
rc=$?
set -e
[ "$rc" = 2 ] && grep -q "max-bad-steps" err3.txt || fail "a negative --max-bad-steps is not refused (exit $rc)"
echo "ok: --max-bad-steps -1 refused"
