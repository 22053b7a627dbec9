"""deepseek-ai/DualPipe's example checks (test_dualpipe_compat.py) as their scripts run them: processes under torchrun,
torch.distributed initialized first, DualPipe(modules) finding its ranks by itself, the gradient check's all-gather
through torch.distributed; then the torch.distributed.pipelining-style script of test_pipelining_compat.py
(Schedule1F1B over the processes, ScheduleDualPipeV over twice as many stages). One launch runs them all on every
rank; prints one line per rank and exits 1 if a check failed.

    torchrun --nproc-per-node 4 tests/python/dualpipe_torchrun.py
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_dualpipe_compat as example  # noqa: E402
import test_pipelining_compat as pipelining  # noqa: E402

import duplex.torch as dt  # noqa: E402


def pipelining_checks(kind, num_stages, rank, failures):
    """test_pipelining_compat's script on this process's rank: its stages' gradients, and on the last stage's rank
    every microbatch's loss and eval loss, against the whole model in plain PyTorch (fp64, 1e-12)."""
    want_losses, want_grads = pipelining.reference(num_stages)
    got = pipelining.script(kind, num_stages, dt.process_world())
    for i, grads in got["grads"].items():
        for have, want in zip(grads, want_grads[i]):
            if float((have - want).norm()) > 1e-12 * float(want.norm()):
                failures.append(f"{kind}: rank {rank} stage {i} gradient")
    if got["last"]:
        for what in ("losses", "eval"):
            if len(got[what]) != len(want_losses) or any(abs(float(h) - w) > 1e-12 * abs(w)
                                                         for h, w in zip(got[what], want_losses)):
                failures.append(f"{kind}: rank {rank} {what}")


class TorchWorld:
    """What the example functions use of a world (rank, size, all_gather), from torch.distributed."""

    def __init__(self):
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def all_gather(self, tensor, out):
        dist.all_gather(list(out.unbind(0)), tensor)


def main():
    dist.init_process_group("gloo")
    world = TorchWorld()
    failures = []
    example.main_dualpipe(world, failures)
    example.main_dualpipev(world, failures)
    for kind, num_stages in [("1f1b", world.size), ("dualpipev", 2 * world.size)]:
        pipelining_checks(kind, num_stages, world.rank, failures)
    duplex_world = dt.process_world()
    print(f"rank {world.rank} of {world.size} (Duplex world rank {duplex_world.rank} of {duplex_world.size}, backend "
          f"{duplex_world.backend}): {'ok' if not failures else failures}", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
