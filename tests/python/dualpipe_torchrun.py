"""deepseek-ai/DualPipe's example checks (test_dualpipe_compat.py) as their scripts run them: processes under torchrun,
torch.distributed initialized first, DualPipe(modules) finding its ranks by itself, the gradient check's all-gather
through torch.distributed. One launch runs DualPipe and then DualPipeV on every rank; prints one line per rank and
exits 1 if a check failed.

    torchrun --nproc-per-node 4 tests/python/dualpipe_torchrun.py
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_dualpipe_compat as example  # noqa: E402

import duplex.torch as dt  # noqa: E402


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
    duplex_world = dt.process_world()
    print(f"rank {world.rank} of {world.size} (Duplex world rank {duplex_world.rank} of {duplex_world.size}, backend "
          f"{duplex_world.backend}): {'ok' if not failures else failures}", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
