#!/usr/bin/env bash
# Kills one rank of a 4-process training (UCX, launched by hand, no mpirun to clean up after it) and checks that
# every other rank stops within the communication timeout with an error naming the lost rank, instead of hanging.
# usage: kill_one_rank.sh DUPLEX_BIN PORT [VICTIM]
set -uo pipefail
bin=$1 port=$2 victim=${3:-2} n=4 timeout_s=10
dir=$(mktemp -d)
pids=()
for ((r = 0; r < n; r++)); do
    env DUPLEX_RANK=$r DUPLEX_WORLD_SIZE=$n DUPLEX_STORE_ADDR=127.0.0.1:$port DUPLEX_COMM_TIMEOUT=$timeout_s \
        "$bin" train --backend ucx --schedule 1f1b --pp 2 --dp 2 --microbatches 4 --steps 100000 --log-every 1 \
        > "$dir/out.$r" 2>&1 &
    pids+=($!)
done
# Let the training run a few steps, then kill the victim without warning.
for _ in $(seq 1 300); do
    grep -q "^step     3" "$dir/out.0" "$dir/out.1" 2>/dev/null && break
    sleep 0.1
done
kill -9 "${pids[$victim]}"
start=$(date +%s)
rc=0
for ((r = 0; r < n; r++)); do
    [ $r -eq $victim ] && continue
    # Each survivor must exit by itself (non-zero) well within 3 timeouts.
    for _ in $(seq 1 $((30 * timeout_s))); do kill -0 "${pids[$r]}" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "${pids[$r]}" 2>/dev/null; then
        echo "rank $r still running $(( $(date +%s) - start )) s after rank $victim was killed"
        kill -9 "${pids[$r]}"
        rc=1
    fi
    wait "${pids[$r]}"
    code=$?
    echo "rank $r exited with $code after $(( $(date +%s) - start )) s: $(grep -m1 -i "error" "$dir/out.$r")"
    [ $code -ne 0 ] || { echo "rank $r exited 0"; rc=1; }
    grep -qi "rank $victim" "$dir/out.$r" || { echo "rank $r's error does not name rank $victim:"; tail -3 "$dir/out.$r"; rc=1; }
done
wait "${pids[$victim]}" 2>/dev/null
rm -rf "$dir"
exit $rc
