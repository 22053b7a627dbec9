#!/usr/bin/env bash
# Starts N processes by hand (no mpirun) with DUPLEX_* or torchrun-style variables and checks they form one
# world: usage launch_by_hand.sh DUPLEX_BIN N PORT duplex|torchrun
set -euo pipefail
bin=$1 n=$2 port=$3 style=$4
pids=()
for ((r = 0; r < n; r++)); do
    if [ "$style" = torchrun ]; then
        env RANK=$r WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
            "$bin" commbench --backend ucx --op allreduce -b 1K -e 64K -f 8 -n 2 -w 1 > "out.$style.$r" 2>&1 &
    else
        env DUPLEX_RANK=$r DUPLEX_WORLD_SIZE=$n DUPLEX_STORE_ADDR=127.0.0.1:$port \
            "$bin" commbench --backend ucx --op alltoallv -b 1K -e 64K -f 8 -n 2 -w 1 > "out.$style.$r" 2>&1 &
    fi
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
cat "out.$style.0"
grep -q "on $n ranks" "out.$style.0" || { echo "rank 0 did not see $n ranks"; rc=1; }
grep -q "Out of bounds values : 0 OK" "out.$style.0" || rc=1
rm -f out.$style.*
exit $rc
