#!/usr/bin/env bash
# One training run (1F1B PP=2 x DP=2, 3 steps), launched the ways people launch jobs; each must give the losses of
# the in-process run: four processes with Slurm's variables set by hand (backend ucx, the store on the node list's
# first host), mpirun -np 4 (mpi and ucx), and real torchrun --nproc-per-node 4 --no-python (ucx; Duplex's store
# on MASTER_PORT + 1) when TORCHRUN is given.
# usage: train-launchers.sh DUPLEX_BINARY MPIRUN [TORCHRUN]
set -euo pipefail
duplex=$1 mpirun=$2 torchrun=${3:-}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
args=(train --pp 2 --dp 2 --steps 3 --microbatches 4 --log-every 100)
losses() { python3 -c 'import json, sys; print(" ".join(repr(s["loss"]) for s in json.load(open(sys.argv[1]))["steps"]))' "$1"; }
check() {  # name json
    local got; got=$(losses "$2")
    [ "$got" = "$want" ] || { echo "FAIL: $1 losses [$got], in-process [$want]"; exit 1; }
    echo "ok: $1 == in-process"
}

"$duplex" "${args[@]}" --json inproc.json >/dev/null
want=$(losses inproc.json)
echo "in-process losses: $want"

# Slurm, by hand: what srun sets for 4 tasks on one node.
job=$((200 + RANDOM % 100))  # the store's port: 29500 + job % 1000
pids=()
for r in 0 1 2 3; do
    env SLURM_PROCID=$r SLURM_NTASKS=4 SLURM_LOCALID=$r SLURM_JOB_ID=$job SLURM_STEP_NODELIST=localhost \
        SLURM_STEP_TASKS_PER_NODE=4 "$duplex" "${args[@]}" --backend ucx --json slurm.json >"slurm.$r.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { cat slurm.*.log; echo "FAIL: a Slurm task failed"; exit 1; }; done
check "Slurm variables (4 processes, ucx)" slurm.json

# DUPLEX_TEST_MPIRUN_ARGS: extra mpirun arguments (sanitizer builds: leak checks off, Open MPI's components leak).
for backend in mpi ucx; do
    # shellcheck disable=SC2086
    "$mpirun" --allow-run-as-root --oversubscribe -np 4 ${DUPLEX_TEST_MPIRUN_ARGS:-} \
        -x DUPLEX_STORE_ADDR=127.0.0.1:$((29800 + RANDOM % 100)) \
        "$duplex" "${args[@]}" --backend $backend --json mpirun-$backend.json >mpirun.log 2>&1 \
        || { cat mpirun.log; echo "FAIL: mpirun $backend"; exit 1; }
    check "mpirun -np 4 ($backend)" mpirun-$backend.json
done

if [ -n "$torchrun" ]; then
    "$torchrun" --nproc-per-node 4 --master-port $((29900 + RANDOM % 90)) --no-python \
        "$duplex" "${args[@]}" --backend ucx --json torchrun.json >torchrun.log 2>&1 \
        || { cat torchrun.log; echo "FAIL: torchrun"; exit 1; }
    check "torchrun --nproc-per-node 4 --no-python (ucx)" torchrun.json
fi
