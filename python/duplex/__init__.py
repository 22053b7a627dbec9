"""Duplex: DualPipe bidirectional pipelines, expert parallelism and ZeRO-1, from Python.

    import duplex
    plan = duplex.schedule("dualpipe", pp=8, microbatches=20, cost_f=1, cost_b=2, cost_w=1, cost_fb=3)
    plan.makespan                 # 66, as published (whole-number costs give int times)
    duplex.simulate(pp=16, ep=64, schedule="dualpipe")["step_time_s"]

    def work(world):              # one call per rank
        x = numpy.full(4, world.rank, dtype=numpy.float32)
        world.all_reduce(x)       # in place, no copy
    duplex.launch(work, ranks=4)  # in-process ranks; under torchrun/mpirun: backend="ucx" or "mpi"
"""
import json as _json


def _load_the_wheels_nccl_first():
    """torch's wheel needs a newer NCCL than the CUDA toolkit's, under the same soname (libnccl.so.2): whichever loads
    first serves the process, so importing duplex before torch would leave torch without its symbols. When the
    nvidia-nccl wheel is installed beside torch, load it first: it serves both (NCCL keeps its ABI)."""
    import ctypes
    import importlib.util
    import os
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(base, "nccl", "lib", "libnccl.so.2")
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return


_load_the_wheels_nccl_first()

from ._duplex import Communicator, DivergenceError, Plan, backends, launch, schedule, stages_of_rank  # noqa: E402,F401
from . import _duplex  # noqa: E402

__all__ = ["Communicator", "DivergenceError", "Plan", "backends", "commbench", "launch", "schedule", "simulate",
           "stages_of_rank"]


def commbench(op="alltoall", ranks=4, sizes=(1 << 20,), backend="inproc", iters=20, warmup=5, check=True,
              virtual_nodes=0, skew=1.0):
    """`duplex commbench` from Python: times `op` (p2p, alltoall, alltoallv, allgather, reducescatter, allreduce) at
    each size in bytes on `ranks` ranks (threads with backend inproc; under mpirun/torchrun this process's rank with
    mpi or ucx). Returns one dict per size with the fields of `duplex commbench --json`'s rows: size, count, type,
    time_us, algbw_gbs, busbw_gbs (nccl-tests' bus bandwidth), wrong (elements that failed the check).

        duplex.commbench(op="alltoall", ranks=4, sizes=[1 << 20])[0]["busbw_gbs"]
    """
    return _duplex._commbench(op, int(ranks), [int(s) for s in sizes], backend, int(iters), int(warmup), bool(check),
                              int(virtual_nodes), float(skew))


def simulate(model="deepseek-v3", cluster="h800x2048", pp=16, ep=64, schedule="dualpipe", microbatches=0,
             global_batch=15360, mb_sequences=1, fp8=True, recompute=True, dispatch="hierarchical",
             partition="balanced", comm_sms=-1, elem_bytes=2.0, device="", gpus=0, gpus_per_node=0,
             sequential_hops=False, ignore_memory=False, free_comm=False, vpp=1, tp=1, cp=1, etp=1, seq_len=0,
             serial_grad_sync=False):
    """Predicts one training step of `model` on `cluster` with a parallel layout, as `duplex simulate --json`.

    Returns the same fields as a dict: step_time_s, pipeline_s, bubble_fraction, mfu, tokens_per_s_per_gpu,
    gpu_hours_per_trillion_tokens, exposed_comm_s, memory_per_gpu_bytes, fits, per-stage costs, ...
    A layout that cannot run raises ValueError naming the constraint it breaks. pp counts model stages (dualpipev
    holds two per rank, interleaved and interleaved-fb vpp); tp (with sequence parallelism), cp (ring attention) and
    etp (the experts' own TP) shard every stage, as `duplex simulate --tp/--cp/--etp`.
    """
    text = _duplex._simulate_json(model, cluster, pp, ep, schedule, microbatches, global_batch, mb_sequences, fp8,
                                  recompute, dispatch, partition, comm_sms, elem_bytes, device, gpus, gpus_per_node,
                                  sequential_hops, ignore_memory, free_comm, vpp, tp, cp, etp, seq_len,
                                  serial_grad_sync)
    return _json.loads(text)
