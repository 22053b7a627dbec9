"""The Duplex world of a process that a launcher started (torchrun, mpirun, Slurm), for code that is not written as
a duplex.launch rank function: a script that calls torch.distributed.init_process_group and then builds a DualPipe
or a pipelining schedule. The world is made once per process, the first time one is asked for, and lives until the
process exits.

    import torch.distributed as dist
    dist.init_process_group("gloo")
    world = duplex.torch.process_world()       # the same rank and size as torch.distributed's

How: duplex.launch(backend=...) runs on a helper thread whose rank function hands its world over and waits for
the interpreter's exit (then it leaves through launch's closing barrier, as a rank function returning). An
exception that ends the script is passed to that rank function, so launch aborts the job and every other rank stops
at once instead of waiting for its timeout. The backend: DUPLEX_BACKEND, else ucx (the rendezvous store on
torchrun's MASTER_PORT + 1), else mpi."""
import atexit
import os
import sys
import threading

from . import _duplex

_lock = threading.Lock()
_state = {}
# The variables by which a launcher tells a process its rank (comm/launch.hpp: process_env reads them).
_LAUNCHER_VARS = ("RANK", "DUPLEX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")


def _backend():
    chosen = os.environ.get("DUPLEX_BACKEND")
    if chosen:
        return chosen
    built = _duplex.backends()
    for name in ("ucx", "mpi"):
        if name in built:
            return name
    raise RuntimeError(f"no process backend is built into duplex (built: {', '.join(built)}); a process world needs "
                       "ucx or mpi")


def _torch_rank_and_size():
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_rank(), dist.get_world_size()


def process_world(timeout_s=-1.0, who="process_world"):
    """This process's Duplex world (made on the first call; a collective then: every rank calls it). Raises when no
    launcher started this process (run in-process ranks with duplex.torch.run instead)."""
    with _lock:
        if "world" in _state:
            return _state["world"]
        if not any(k in os.environ for k in _LAUNCHER_VARS):
            raise ValueError(f"{who}: no process group — no launcher started this process (torchrun, mpirun, srun, "
                             "duplex launch): call torch.distributed.init_process_group under one, pass a Duplex "
                             "communicator, or build it inside a duplex.torch.run rank function")
        ready, leave = threading.Event(), threading.Event()
        failure = []

        def hold(world):
            _state["world"] = world
            ready.set()
            leave.wait()
            if failure:  # the script ended with an exception: launch aborts the job, the other ranks stop
                raise RuntimeError(failure[0])

        def serve():
            try:
                _duplex.launch(hold, backend=_backend(), timeout_s=timeout_s)
            except BaseException as e:  # noqa: BLE001 (reported to the caller or at exit)
                _state["error"] = e
            finally:
                ready.set()

        thread = threading.Thread(target=serve, name="duplex-process-world", daemon=True)
        thread.start()
        ready.wait()
        if "world" not in _state:
            raise RuntimeError(f"could not make this process's Duplex world: {_state.get('error')}")

        previous_hook = sys.excepthook

        def on_uncaught(kind, value, tb):
            failure.append(f"{kind.__name__}: {value}")
            previous_hook(kind, value, tb)

        def on_exit():
            leave.set()
            thread.join()

        sys.excepthook = on_uncaught
        atexit.register(on_exit)
        world = _state["world"]
        torch_view = _torch_rank_and_size()
        if torch_view is not None and torch_view != (world.rank, world.size):
            raise RuntimeError(f"torch.distributed says rank {torch_view[0]} of {torch_view[1]}, the launcher's "
                               f"environment rank {world.rank} of {world.size}")
        return world


def group_world(group, who):
    """The Duplex communicator for a `process_group=`/`group=` argument: a Duplex communicator as it is; None or a
    torch.distributed group spanning every rank: the process world (or the world of the duplex.torch.run rank
    function running on this thread)."""
    if isinstance(group, _duplex.Communicator):
        return group
    from ._experts import _current_world
    if group is not None:
        import torch.distributed as dist
        if dist.get_world_size(group) != dist.get_world_size():
            raise ValueError(f"{who}: a torch.distributed group of {dist.get_world_size(group)} of the "
                             f"{dist.get_world_size()} ranks; Duplex runs pipelines over the whole world (or pass a "
                             "Duplex communicator)")
    world = _current_world()
    return world if world is not None else process_world(who=who)
