"""duplex.torch's torch.distributed.pipelining-style interface (PipelineStage, Schedule1F1B, ScheduleZB1P,
ScheduleDualPipe, ScheduleDualPipeV, ScheduleInterleaved1F1B — two stages per rank, r and r + ranks): a script
written the pipelining way — stages built from the model's blocks by index, schedule.step(x, target=y,
losses=losses) on the first and last stage's ranks, step() elsewhere — gives each microbatch's loss and the
gradients (divided by the microbatch count, as torch's scale_grads does) of the whole model run in plain PyTorch,
fp64 to 1e-12; eval() gives the losses with no gradient."""
import threading
import unittest

import torch

import duplex.torch as dt
from duplex.torch import (PipelineStage, Schedule1F1B, ScheduleDualPipe, ScheduleDualPipeV, ScheduleInterleaved1F1B,
                          ScheduleZB1P)

WIDTH, ROWS, N = 8, 3, 8
_build = threading.Lock()


def blocks(num_stages):
    with _build:
        torch.manual_seed(5)
        return [torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()).double()
                for _ in range(num_stages)]


def data():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(N * ROWS, WIDTH, generator=g, dtype=torch.float64),
            torch.randn(N * ROWS, WIDTH, generator=g, dtype=torch.float64))


def reference(num_stages):
    model = torch.nn.Sequential(*blocks(num_stages))
    x, y = data()
    losses = []
    for xm, ym in zip(x.tensor_split(N), y.tensor_split(N)):
        loss = torch.nn.functional.mse_loss(model(xm), ym)
        (loss / N).backward()
        losses.append(float(loss.detach()))
    return losses, [[p.grad.clone() for p in b.parameters()] for b in model]


def indices(kind, num_stages, rank):
    if kind in ("dualpipe", "dualpipev"):
        return [rank, num_stages - 1 - rank]
    if kind == "interleaved":  # torch's loop placement, two stages per rank
        return [rank, rank + num_stages // 2]
    return [rank]


SCHEDULES = {"1f1b": Schedule1F1B, "zb1p": ScheduleZB1P, "dualpipe": ScheduleDualPipe, "dualpipev": ScheduleDualPipeV,
             "interleaved": ScheduleInterleaved1F1B}


def script(kind, num_stages, world):
    """One rank of the pipelining script: its per-microbatch losses and eval losses (on the last stage's rank), the
    merged output, and its stages' gradients."""
    model_blocks = blocks(num_stages)
    mine = indices(kind, num_stages, world.rank)
    stages = [PipelineStage(model_blocks[i], i, num_stages, "cpu") for i in mine]
    schedule = SCHEDULES[kind](stages if len(stages) > 1 else stages[0], n_microbatches=N,
                               loss_fn=torch.nn.functional.mse_loss)
    x, y = data()
    losses = []
    first, last = 0 in mine, num_stages - 1 in mine
    args = (x,) if first else ()
    output = schedule.step(*args, target=y if last else None, losses=losses if last else None)
    grads = {i: [p.grad.clone() for p in model_blocks[i].parameters()] for i in mine}
    eval_losses = []
    schedule.eval(*args, target=y if last else None, losses=eval_losses if last else None)
    schedule.close()
    return dict(losses=losses, output=output, grads=grads, eval=eval_losses, last=last)


class PipeliningScripts(unittest.TestCase):
    def run_script(self, kind, num_stages):
        ranks = num_stages // 2 if kind in ("dualpipev", "interleaved") else num_stages
        out, lock = {}, threading.Lock()

        def rank_main(world):
            result = script(kind, num_stages, world)
            with lock:
                out[world.rank] = result

        dt.run(rank_main, ranks=ranks, timeout_s=60)
        return out

    def test_every_schedule(self):
        for kind, num_stages in [("1f1b", 2), ("1f1b", 4), ("zb1p", 4), ("dualpipe", 4), ("dualpipev", 4),
                                 ("interleaved", 4), ("interleaved", 8)]:
            with self.subTest(kind=kind, num_stages=num_stages):
                want_losses, want_grads = reference(num_stages)
                out = self.run_script(kind, num_stages)
                self.assertEqual(len(out), num_stages // 2 if kind in ("dualpipev", "interleaved") else num_stages)
                # The last stage's rank; DualPipe's two (the down direction's, the last rank, has the first half).
                holders = sorted((r for r, o in out.items() if o["last"]), reverse=True)
                self.assertEqual(len(holders), 2 if kind == "dualpipe" else 1)
                got = [l for r in holders for l in out[r]["losses"]]
                evals = [l for r in holders for l in out[r]["eval"]]
                self.assertEqual(len(got), N)
                for i, (have, want) in enumerate(zip(got, want_losses)):
                    self.assertLessEqual(abs(float(have) - want), 1e-12 * abs(want), f"microbatch {i}")
                    self.assertLessEqual(abs(float(evals[i]) - want), 1e-12 * abs(want), f"eval {i}")
                self.assertEqual(sum(out[r]["output"].shape[0] for r in holders), N * ROWS)
                for r, ro in out.items():
                    if r not in holders:
                        self.assertIsNone(ro["output"])
                    for i, grads in ro["grads"].items():
                        for have, want in zip(grads, want_grads[i]):
                            self.assertLessEqual(float((have - want).norm()), 1e-12 * float(want.norm()),
                                                 f"rank {r} stage {i}")


if __name__ == "__main__":
    unittest.main(verbosity=2)
