"""duplex.torch's expert dispatch/combine: an MoE model written in plain PyTorch, its routed experts spread over
an expert-parallel group inside data parallelism (PP=2 x DP=2, EP=2: each rank holds 2 of 4 experts), trained
through a Pipeline, equals the same model with every expert local, trained by plain PyTorch in one process
(fp64, three SGD steps: losses and every parameter within 1e-12)."""
import threading
import unittest

import torch

import duplex.torch as dt

W, E, K, ROWS = 12, 4, 2, 6
_init = threading.Lock()


class Moe(torch.nn.Module):
    """Linear + tanh, then a top-K MoE over E experts (softmax gates renormalized over the chosen K). With
    `experts_on` = (ep_rank, ep_size) only that rank's E / ep_size experts live here and tokens travel."""

    def __init__(self, head=False):
        super().__init__()
        self.inp = torch.nn.Linear(W, W)
        self.router = torch.nn.Linear(W, E)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(W, W) for _ in range(E))
        self.head = torch.nn.Linear(W, 1) if head else None
        self.experts_on = None

    def keep_experts(self, ep_rank, ep_size):
        per = E // ep_size
        self.first = ep_rank * per
        self.experts = dt.mark_experts(torch.nn.ModuleList(list(self.experts)[self.first:self.first + per]))
        self.experts_on = (ep_rank, ep_size)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        probs = torch.softmax(self.router(h), dim=-1)
        gate, eid = torch.topk(probs, K, dim=-1)
        gate = gate / gate.sum(-1, keepdim=True)
        rows = h.repeat_interleave(K, dim=0)  # one row per (token, k)
        eid = eid.reshape(-1)
        if self.experts_on is None:
            out = torch.zeros_like(rows)
            for e in range(E):
                sel = eid == e
                out[sel] = self.experts[e](rows[sel])
        else:
            per = E // self.experts_on[1]
            got, routed = dt.dispatch(rows, eid // per)
            got_eid, _ = dt.dispatch(eid.to(rows.dtype)[:, None], eid // per)
            local = got_eid[:, 0].to(torch.int64) - self.first
            out_here = torch.zeros_like(got)
            for j, expert in enumerate(self.experts):
                sel = local == j
                out_here[sel] = expert(got[sel])
            out = dt.combine(out_here, routed)
        y = h + (out.reshape(-1, K, W) * gate[..., None]).sum(1)
        return self.head(y) if self.head is not None else y


def make_model(seed=7):
    with _init:
        torch.manual_seed(seed)
        return [Moe().double(), Moe(head=True).double()]


def batch(step, n):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(n * ROWS, W, generator=g, dtype=torch.float64), torch.randn(n * ROWS, 1, generator=g,
                                                                                   dtype=torch.float64)


class ExpertParallel(unittest.TestCase):
    def test_distributed_moe_equals_plain_pytorch(self):
        pp, dp, ep, n, steps = 2, 2, 2, 4, 3
        for schedule in ["1f1b", "zb1p", "dualpipe"]:
            with self.subTest(schedule=schedule):
                self.run_schedule(schedule, pp, dp, ep, n, steps)

    def run_schedule(self, schedule, pp, dp, ep, n, steps):
        stages = make_model()
        model = torch.nn.Sequential(*stages)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        want_losses = []
        for step in range(1, steps + 1):
            x, y = batch(step, n * dp)
            total = 0.0
            for xm, ym in zip(torch.chunk(x, n * dp), torch.chunk(y, n * dp)):
                loss = torch.nn.functional.mse_loss(model(xm), ym) / (n * dp)
                loss.backward()
                total += float(loss.detach())
            want_losses.append(total)
            opt.step()
            opt.zero_grad()
        want = {f"{s}.{name}": p.detach() for s, st in enumerate(stages) for name, p in st.named_parameters()}

        got, losses, lock = {}, {}, threading.Lock()

        def rank_main(world):
            blocks = make_model()
            r, d = world.rank // dp, world.rank % dp
            mine = [blocks[r]] if schedule in ("1f1b", "zb1p") else [blocks[r], blocks[pp - 1 - r]]
            for m in mine:
                m.keep_experts(d % ep, ep)
            pipe = dt.Pipeline(world, mine, schedule=schedule, pp=pp, dp=dp, ep=ep, microbatches=n,
                               loss_fn=torch.nn.functional.mse_loss, activation_shape=(ROWS, W))
            opt = torch.optim.SGD([p for m in mine for p in m.parameters()], lr=0.1)
            mine_losses = []
            for step in range(1, steps + 1):
                mine_losses.append(pipe.step(*batch(step, n * dp)))
                opt.step()
                opt.zero_grad()
            pipe.close()
            with lock:
                if world.rank == 0:
                    losses["l"] = mine_losses
                for m in mine:
                    s = blocks.index(m)
                    for name, p in m.named_parameters():
                        if name.startswith("experts."):
                            j = int(name.split(".")[1])
                            name = f"experts.{m.first + j}." + name.split(".", 2)[2]
                        got[f"{s}.{name}"] = p.detach().clone()

        dt.run(rank_main, ranks=pp * dp, timeout_s=120)
        for s in range(steps):
            self.assertLessEqual(abs(losses["l"][s] - want_losses[s]), 1e-12 * abs(want_losses[s]), f"step {s + 1}")
        self.assertEqual(sorted(got), sorted(want))
        for name, w in want.items():
            self.assertLessEqual(float((got[name] - w).norm() / w.norm()), 1e-12, name)


if __name__ == "__main__":
    unittest.main(verbosity=2)
