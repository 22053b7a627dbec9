"""A PyTorch model trained with Duplex as its pipeline backend: DualPipe over 4 stages (or any schedule), with
data parallelism, the same script on in-process ranks or one rank per process:

    python examples/torch_pipeline.py --ranks 4                          # 4 ranks as threads of this process
    mpirun -np 4 python examples/torch_pipeline.py --backend mpi         # one rank per process (Open MPI)
    mpirun -np 4 -x DUPLEX_STORE_ADDR=127.0.0.1:29500 python examples/torch_pipeline.py --backend ucx

The model is 4 blocks of (Linear, Tanh) regressing a smooth function; each rank builds the same blocks from the
same seed and keeps the ones its schedule places on it. Rank 0 prints the loss of every step.
"""
import argparse
import threading

import torch

import duplex
import duplex.torch as dt

WIDTH, ROWS, STAGES = 32, 8, 4


def make_blocks(seed=0):
    torch.manual_seed(seed)
    blocks = []
    for s in range(STAGES):
        layers = [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
        if s == STAGES - 1:
            layers.append(torch.nn.Linear(WIDTH, 1))
        blocks.append(torch.nn.Sequential(*layers).double())
    return blocks


def batch(step, n):
    g = torch.Generator().manual_seed(step)
    x = torch.rand(n * ROWS, WIDTH, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:2])
    return x, y


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="inproc", help="inproc (threads), or mpi / ucx under mpirun")
    ap.add_argument("--ranks", type=int, default=4, help="inproc: how many ranks")
    ap.add_argument("--schedule", default="dualpipe", help="1f1b, zb1p, dualpipe or dualpipev")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--microbatches", type=int, default=8, help="per replica")
    a = ap.parse_args()
    init = threading.Lock()

    def rank_main(world):
        with init:  # ranks may be threads: one at a time through torch's global RNG
            blocks = make_blocks()
        pp = STAGES
        r = world.rank // a.dp
        # The stages the schedule places on this rank, asked for by index.
        pipe = dt.Pipeline(world, lambda s: blocks[s], schedule=a.schedule, pp=pp, dp=a.dp, microbatches=a.microbatches,
                           loss_fn=torch.nn.functional.mse_loss)
        opt = torch.optim.Adam([p for m in pipe.modules for p in m.parameters()], lr=3e-3)
        for step in range(1, a.steps + 1):
            loss = pipe.step(*batch(step, a.dp * a.microbatches))
            opt.step()
            opt.zero_grad()
            if world.rank == 0:
                m = pipe.last_metrics
                print(f"step {step:3d} loss {loss!r} bubble {100 * m['bubble_fraction']:.1f}%", flush=True)
        pipe.close()

    duplex.launch(rank_main, ranks=a.ranks, backend=a.backend, timeout_s=120)


if __name__ == "__main__":
    main()
