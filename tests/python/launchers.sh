#!/usr/bin/env bash
# The same duplex.torch script on in-process ranks, under mpirun (backends mpi and ucx) and under torchrun
# (backend ucx; Duplex's store on MASTER_PORT + 1 beside torchrun's own), one rank per process, prints the same
# losses, bit for bit (fp64; every reduction in a fixed order).
# usage: launchers.sh PYTHON MPIRUN BUILD_DIR SOURCE_DIR PORT
set -euo pipefail
py=$1 mpirun=$2 build=$3 src=$4 port=$5
export PYTHONPATH=$build/python
script=$src/examples/torch_pipeline.py
args=(--schedule dualpipe --steps 4)
want=$("$py" "$script" --ranks 4 "${args[@]}" | grep -o "^step .* loss [^ ]*")
echo "$want"
for backend in mpi ucx; do
    got=$("$mpirun" --allow-run-as-root --oversubscribe -np 4 -x PYTHONPATH -x DUPLEX_STORE_ADDR=127.0.0.1:$port \
          "$py" "$script" --backend $backend "${args[@]}" | grep -o "^step .* loss [^ ]*")
    if [ "$got" != "$want" ]; then
        echo "launchers: $backend under mpirun gave"; echo "$got"; exit 1
    fi
    echo "$backend under mpirun: the same losses"
done
torchrun=$(dirname "$py")/torchrun
got=$("$torchrun" --nproc-per-node 4 --master-port $((port + 1)) "$script" --backend ucx "${args[@]}" \
      | grep -o "^step .* loss [^ ]*")
if [ "$got" != "$want" ]; then
    echo "launchers: ucx under torchrun gave"; echo "$got"; exit 1
fi
echo "ucx under torchrun: the same losses"
