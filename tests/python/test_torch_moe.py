"""duplex.torch on a small MoE language model written in plain PyTorch — an embedding, blocks with an MoE layer
(top-2 of 4 experts), an output head with cross-entropy — split into stages and trained through a Pipeline under
every schedule, PP in {2, 4}, DP in {1, 2}, EP in {1, 2} (routed experts spread over the expert-parallel group
inside DP, tokens moved by duplex.torch.dispatch/combine): it equals the same model with every expert local,
trained by plain PyTorch in one process on the same batch — fp64: losses and every parameter after three SGD
steps within 1e-12; fp32: step-1 loss within 1e-6, parameters within 1e-5."""
import threading
import unittest

import torch

import duplex.torch as dt

W, E, K, ROWS, VOCAB = 12, 4, 2, 6, 20
_init = threading.Lock()


class Moe(torch.nn.Module):
    """Linear + tanh, then a top-K MoE over E experts (softmax gates renormalized over the chosen K). With
    `experts_on` = (ep_rank, ep_size) only that rank's E / ep_size experts live here and tokens travel."""

    def __init__(self, head=False, embed=False):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, W) if embed else None
        self.inp = torch.nn.Linear(W, W)
        self.router = torch.nn.Linear(W, E)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(W, W) for _ in range(E))
        self.head = torch.nn.Linear(W, VOCAB) if head else None
        self.experts_on = None

    def keep_experts(self, ep_rank, ep_size):
        per = E // ep_size
        self.first = ep_rank * per
        self.experts = dt.mark_experts(torch.nn.ModuleList(list(self.experts)[self.first:self.first + per]))
        self.experts_on = (ep_rank, ep_size)

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
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


def make_model(pp, dtype, seed=7):
    with _init:
        torch.manual_seed(seed)
        return [Moe(embed=s == 0, head=s == pp - 1).to(dtype) for s in range(pp)]


def batch(step, n):
    g = torch.Generator().manual_seed(50 + step)
    tokens = torch.randint(VOCAB, (n * ROWS,), generator=g)
    return tokens, (tokens * 7 + 3) % VOCAB  # a lookup to learn


loss_fn = torch.nn.functional.cross_entropy


class ExpertParallel(unittest.TestCase):
    def test_every_layout_fp64(self):
        for schedule in ["1f1b", "zb1p", "dualpipe", "dualpipev"]:
            for pp in [2, 4]:
                for dp, ep in [(1, 1), (2, 1), (2, 2)]:
                    with self.subTest(schedule=schedule, pp=pp, dp=dp, ep=ep):
                        self.check(schedule, pp, dp, ep, torch.float64, 1e-12, 1e-12)

    def test_fp32(self):
        for schedule in ["zb1p", "dualpipe"]:
            with self.subTest(schedule=schedule):
                self.check(schedule, 4, 2, 2, torch.float32, 1e-6, 1e-5)

    def check(self, schedule, pp, dp, ep, dtype, loss_tol, param_tol):
        n, steps = 2 * pp, 3
        stages = make_model(pp, dtype)
        model = torch.nn.Sequential(*stages)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        want_losses = []
        for step in range(1, steps + 1):
            x, y = batch(step, n * dp)
            total = 0.0
            for xm, ym in zip(torch.chunk(x, n * dp), torch.chunk(y, n * dp)):
                loss = loss_fn(model(xm), ym) / (n * dp)
                loss.backward()
                total += float(loss.detach())
            want_losses.append(total)
            opt.step()
            opt.zero_grad()
        want = {f"{s}.{name}": p.detach() for s, st in enumerate(stages) for name, p in st.named_parameters()}

        got, losses, lock = {}, {}, threading.Lock()
        ranks_per_replica = pp // 2 if schedule == "dualpipev" else pp

        def rank_main(world):
            blocks = make_model(pp, dtype)
            r, d = world.rank // dp, world.rank % dp
            mine = [blocks[r]] if schedule in ("1f1b", "zb1p") else [blocks[r], blocks[pp - 1 - r]]
            if ep > 1:
                for m in mine:
                    m.keep_experts(d % ep, ep)
            pipe = dt.Pipeline(world, mine, schedule=schedule, pp=pp, dp=dp, ep=ep, microbatches=n, loss_fn=loss_fn,
                               activation_shape=(ROWS, W), dtype=dtype)
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
                        if name.startswith("experts.") and ep > 1:
                            j = int(name.split(".")[1])
                            name = f"experts.{m.first + j}." + name.split(".", 2)[2]
                        got[f"{s}.{name}"] = p.detach().clone()

        dt.run(rank_main, ranks=ranks_per_replica * dp, timeout_s=120)
        self.assertLessEqual(abs(losses["l"][0] - want_losses[0]), loss_tol * abs(want_losses[0]), "step 1")
        if dtype == torch.float64:
            for s in range(1, steps):
                self.assertLessEqual(abs(losses["l"][s] - want_losses[s]), loss_tol * abs(want_losses[s]),
                                     f"step {s + 1}")
        self.assertEqual(sorted(got), sorted(want))
        for name, w in want.items():
            self.assertLessEqual(float((got[name] - w).norm() / w.norm()), param_tol, name)


if __name__ == "__main__":
    unittest.main(verbosity=2)
