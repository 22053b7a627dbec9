"""duplex.torch on a small MoE language model written in plain PyTorch — an embedding, blocks with an MoE layer
(top-2 of 4 experts), an output head with cross-entropy — split into stages and trained through a Pipeline under
every schedule, PP in {2, 4}, DP in {1, 2}, EP in {1, 2} (routed experts spread over the expert-parallel group
inside DP, tokens moved by duplex.torch.dispatch/combine), and EP = 4 over two (virtual) nodes on the node-limited
path: it equals the same model with every expert local,
trained by plain PyTorch in one process on the same batch — fp64: losses and every parameter after three SGD
steps within 1e-12; fp32: step-1 loss within 1e-6, parameters within 1e-5; BF16 on fp32 masters (class Bf16: the
bound and why)."""
import math
import threading
import unittest

import torch

import duplex
import duplex.torch as dt
from common import train_pipeline

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
        self.paths = set()  # node-limited or flat, as dispatch chose

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        h = torch.tanh(self.inp(x))
        probs = torch.softmax(self.router(h), dim=-1)
        gate, eid = torch.topk(probs, K, dim=-1)
        gate = gate / gate.sum(-1, keepdim=True)
        if self.experts_on is None:
            rows = h.repeat_interleave(K, dim=0)  # one row per (token, k)
            flat = eid.reshape(-1)
            out = torch.zeros_like(rows)
            for e in range(E):
                sel = flat == e
                out[sel] = self.experts[e](rows[sel])
            y = h + (out.reshape(-1, K, W) * gate[..., None]).sum(1)
        else:
            per = E // self.experts_on[1]
            got, routed = dt.dispatch(h, eid // per, tags=eid)  # one row per (token, k) that targets this rank
            self.paths.add(routed.node_limited)
            local = routed.tags - self.first
            out_here = torch.zeros_like(got)
            for j, expert in enumerate(self.experts):
                sel = local == j
                out_here[sel] = expert(got[sel])
            y = h + dt.combine(out_here, routed, gate)
        return self.head(y) if self.head is not None else y


def make_model(pp, dtype, seed=7):
    with _init:
        torch.manual_seed(seed)
        return [Moe(embed=s == 0, head=s == pp - 1).to(dtype) for s in range(pp)]


def rank_stages(world, schedule, pp, dp, ep, dtype, vpp=1):
    """The whole model's blocks, and this rank's stages among them (their experts kept for its EP rank)."""
    blocks = make_model(pp, dtype)
    mine = [blocks[s] for s in duplex.stages_of_rank(schedule, pp, world.rank // dp, vpp)]
    if ep > 1:
        for m in mine:
            m.keep_experts(world.rank % dp % ep, ep)
    return blocks, mine


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

    def test_node_limited_fp64(self):
        # 8 ranks on 4 virtual nodes of 2: each EP group of 4 spans two nodes, so tokens cross once per node.
        for schedule in ["1f1b", "dualpipe"]:
            with self.subTest(schedule=schedule):
                self.check(schedule, 2, 4, 4, torch.float64, 1e-12, 1e-12, virtual_nodes=4)

    def test_interleaved_fb_pairs_fp64(self):
        # Interleaved 1F1B with its steady state as F&B pairs (VPP 2: 4 stages on 2 ranks), EP 2: one microbatch's
        # expert exchange waited through while the other computes, equal to the whole model.
        self.check("interleaved-fb", 4, 2, 2, torch.float64, 1e-12, 1e-12, vpp=2)

    def test_fp32(self):
        for schedule in ["zb1p", "dualpipe"]:
            with self.subTest(schedule=schedule):
                self.check(schedule, 4, 2, 2, torch.float32, 1e-6, 1e-5)

    def check(self, schedule, pp, dp, ep, dtype, loss_tol, param_tol, virtual_nodes=0, vpp=1):
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

        got, losses, paths, lock = {}, {}, set(), threading.Lock()
        ranks_per_replica = pp // 2 if schedule == "dualpipev" else pp // vpp

        def rank_main(world):
            blocks, mine = rank_stages(world, schedule, pp, dp, ep, dtype, vpp)
            pipe = dt.Pipeline(world, mine, schedule=schedule, pp=pp, dp=dp, ep=ep, microbatches=n, loss_fn=loss_fn,
                               activation_shape=(ROWS, W), dtype=dtype, vpp=vpp)
            opt = torch.optim.SGD([p for m in mine for p in m.parameters()], lr=0.1)
            mine_losses = train_pipeline(pipe, opt, (batch(step, n * dp) for step in range(1, steps + 1)))
            with lock:
                if world.rank == 0:
                    losses["l"] = mine_losses
                    losses["fb_ep_hidden"] = pipe.last_metrics["fb_ep_comm_hidden_fraction"]
                for m in mine:
                    paths.update(getattr(m, "paths", ()))
                    s = blocks.index(m)
                    for name, p in m.named_parameters():
                        got[f"{s}.{global_name(m, name, ep)}"] = p.detach().clone()

        dt.run(rank_main, ranks=ranks_per_replica * dp, timeout_s=120, virtual_nodes=virtual_nodes)
        self.assertLessEqual(abs(losses["l"][0] - want_losses[0]), loss_tol * abs(want_losses[0]), "step 1")
        if dtype == torch.float64:
            for s in range(1, steps):
                self.assertLessEqual(abs(losses["l"][s] - want_losses[s]), loss_tol * abs(want_losses[s]),
                                     f"step {s + 1}")
        if ep > 1:  # the path dispatch took: node-limited exactly when the EP group spans nodes
            self.assertEqual(paths, {virtual_nodes > 0})
        if ep > 1 and schedule in ("dualpipe", "dualpipev", "interleaved-fb"):  # waited through the stage call
            self.assertFalse(math.isnan(losses["fb_ep_hidden"]), "no expert exchange was waited for inside an F&B pair")
        self.assertEqual(sorted(got), sorted(want))
        for name, w in want.items():
            self.assertLessEqual(float((got[name] - w).norm() / w.norm()), param_tol, name)


BF16 = torch.bfloat16


def loss_fp32(logits, labels):
    """Cross-entropy of BF16 logits computed in fp32, as BF16 training does."""
    return loss_fn(logits.float(), labels)


def ulp_bf16(x):
    """One BF16 unit in the last place at each element of x (the spacing of BF16 numbers there)."""
    exp = torch.frexp(x.float().abs().clamp_min(2.0 ** -126))[1]
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp - 8)


def adamw_reference(master, grad, m, v, step, lr):
    """Duplex's AdamW formula (betas 0.9/0.95, eps 1e-8, no decay) written out: float64 math, rounded to fp32
    where the moments and the parameter are stored."""
    g = grad.double()
    m.copy_((0.9 * m.double() + 0.1 * g).float())
    v.copy_((0.95 * v.double() + 0.05 * g * g).float())
    update = (m.double() / (1 - 0.9 ** step)) / ((v.double() / (1 - 0.95 ** step)).sqrt() + 1e-8)
    master.copy_((master.double() - lr * update).float())


def reference_bf16(pp, n, steps, optimizer, lr):
    """The BF16 model whole in plain PyTorch on the same microbatches: each microbatch's gradients (BF16, as
    autograd gives them) summed in fp32 in microbatch order; then torch SGD on the BF16 parameters with those sums
    rounded to BF16 in .grad (what a Pipeline leaves for a torch optimizer), or AdamW on fp32 masters with the
    parameters rounded from them (what ZeroAdamW does). Returns each step's mean loss, the first step's fp32
    gradient sums and the parameters at the end, by name."""
    stages = make_model(pp, BF16)
    model = torch.nn.Sequential(*stages)
    named = [(f"{s}.{k}", p) for s, st in enumerate(stages) for k, p in st.named_parameters()]
    params = [p for _, p in named]
    masters = [p.detach().float() for p in params]
    moments = [(torch.zeros_like(m), torch.zeros_like(m)) for m in masters]
    sgd = torch.optim.SGD(params, lr=lr)
    losses, first_sums = [], None
    for step in range(1, steps + 1):
        x, y = batch(step, n)
        sums = [torch.zeros_like(m) for m in masters]
        total = 0.0
        for xm, ym in zip(torch.chunk(x, n), torch.chunk(y, n)):
            loss = loss_fp32(model(xm), ym)
            total += float(loss.detach())
            for acc, g in zip(sums, torch.autograd.grad(loss * (1.0 / n), params, allow_unused=True)):
                if g is not None:
                    acc.add_(g)
        losses.append(total / n)
        first_sums = first_sums or {name: g.clone() for (name, _), g in zip(named, sums)}
        with torch.no_grad():
            if optimizer == "sgd":
                for p, g in zip(params, sums):
                    p.grad = g.to(BF16)
                sgd.step()
            else:
                for p, master, g, (m, v) in zip(params, masters, sums, moments):
                    adamw_reference(master, g, m, v, step, lr)
                    p.copy_(master)
    return losses, first_sums, {name: p.detach().clone() for name, p in named}


def run_bf16(schedule, pp, dp, ep, steps, optimizer, lr):
    """The same through duplex.torch: rank 0's losses, the first step's gradients (.grad, BF16) and the parameters at
    the end, by name."""
    n = 2 * pp
    got, first_grads, losses, lock = {}, {}, {}, threading.Lock()

    def rank_main(world):
        blocks, mine = rank_stages(world, schedule, pp, dp, ep, BF16)
        zero = dt.ZeroAdamW(lr=lr, weight_decay=0.0, clip=0.0) if optimizer == "adamw" else None
        pipe = dt.Pipeline(world, mine, schedule=schedule, pp=pp, dp=dp, ep=ep, microbatches=n, loss_fn=loss_fp32,
                           optimizer=zero)
        opt = torch.optim.SGD([p for m in mine for p in m.parameters()], lr=lr)
        mine_losses = []
        for step in range(1, steps + 1):
            mine_losses.append(pipe.step(*batch(step, n * dp)))
            if step == 1 and zero is None:
                with lock:
                    for m in mine:
                        for name, p in m.named_parameters():
                            first_grads[f"{blocks.index(m)}.{global_name(m, name, ep)}"] = p.grad.clone()
            if zero is None:
                opt.step()
                opt.zero_grad()
        pipe.close()
        with lock:
            if world.rank == 0:
                losses["l"] = mine_losses
            for m in mine:
                for name, p in m.named_parameters():
                    got[f"{blocks.index(m)}.{global_name(m, name, ep)}"] = p.detach().clone()

    ranks = (pp // 2 if schedule == "dualpipev" else pp) * dp
    dt.run(rank_main, ranks=ranks, timeout_s=180)
    return losses["l"], first_grads, got


def global_name(m, name, ep):
    """A parameter's name in the whole model (an expert kept on an EP rank by its global index)."""
    if name.startswith("experts.") and ep > 1:
        j = int(name.split(".")[1])
        return f"experts.{m.first + j}." + name.split(".", 2)[2]
    return name


class Bf16(unittest.TestCase):
    """BF16 parameters, activations and gradients; fp32 gradient sums and masters. Bitwise equal to the whole model
    where the fp32 sums add the same terms in the same order (1F1B and ZB1P without data or expert parallelism: W runs
    the microbatches in order); elsewhere the sums add the same BF16 terms in another order — two copies summed
    (DualPipe), replicas all-reduced (DP), experts' rows in another grouping (EP) — so the fp32 sums differ by
    rounding (|d| <= (k-1) 2^-24 sum|g_i| for k terms), far below a BF16 unit: after rounding to BF16 an element
    differs by at most one BF16 ulp (a sum near a rounding boundary), and with EP, whose expert GEMMs also run on
    other row groupings (other roundings of BF16 activations), the gradient differs by at most 2 ulps in norm."""

    def test_every_layout_step_one(self):
        want_cache = {}
        for schedule in ["1f1b", "zb1p", "dualpipe", "dualpipev"]:
            for pp in [2, 4]:
                for dp, ep in [(1, 1), (2, 1), (2, 2)]:
                    with self.subTest(schedule=schedule, pp=pp, dp=dp, ep=ep):
                        key = (pp, dp)
                        if key not in want_cache:
                            want_cache[key] = reference_bf16(pp, 2 * pp * dp, 2, "sgd", 0.1)
                        want_losses, want_sums, want_params = want_cache[key]
                        losses, grads, params = run_bf16(schedule, pp, dp, ep, 2, "sgd", 0.1)
                        self.assertEqual(sorted(grads), sorted(want_sums))
                        exact = schedule in ("1f1b", "zb1p") and dp == 1 and ep == 1
                        for name, g in grads.items():
                            want = want_sums[name].to(BF16)
                            if exact:
                                self.assertTrue(torch.equal(g, want), name)
                            elif ep == 1:
                                diff = (g.float() - want.float()).abs()
                                self.assertTrue(bool((diff <= ulp_bf16(want)).all()), f"{name}: {float(diff.max())}")
                            else:
                                rel = float((g.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
                                self.assertLessEqual(rel, 2 * 2.0 ** -8, name)
                        if ep == 1:  # the first step's forward is the same computation
                            self.assertEqual(losses[0], want_losses[0])
                        if exact:
                            self.assertEqual(losses, want_losses)
                            for name, p in params.items():
                                self.assertTrue(torch.equal(p, want_params[name]), name)

    def test_fifty_steps_stay_within_one_percent(self):
        pp, dp, ep, steps = 2, 2, 2, 50
        want, _, _ = reference_bf16(pp, 2 * pp * dp, steps, "sgd", 0.1)
        got, _, _ = run_bf16("dualpipev", pp, dp, ep, steps, "sgd", 0.1)
        self.assertLess(want[-1], 0.85 * want[0], "the model learns")
        for s, (a, b) in enumerate(zip(got, want)):
            self.assertLessEqual(abs(a - b), 0.01 * b, f"step {s + 1}")

    def test_zero_adamw_keeps_fp32_masters(self):
        # Updates of 1e-4 are below half a BF16 unit of most weights: without fp32 masters they would be lost.
        pp, steps, lr = 2, 6, 1e-4
        _, _, want = reference_bf16(pp, 2 * pp, steps, "adamw", lr)
        _, _, got = run_bf16("1f1b", pp, 1, 1, steps, "adamw", lr)
        start = {f"{s}.{k}": p.detach() for s, st in enumerate(make_model(pp, BF16)) for k, p in st.named_parameters()}
        moved = sum(int((want[k] != start[k]).sum()) for k in want)
        self.assertGreater(moved, 0, "the masters moved some weights by a BF16 unit")
        for name, p in got.items():
            self.assertEqual(p.dtype, BF16)
            self.assertTrue(torch.equal(p, want[name]), name)


class Exchange(unittest.TestCase):
    """dispatch/combine on their own (group=world), against a reference that computes every rank's tokens in one
    process: y[n] = sum_k w[n, k] * tanh(x[n] @ A[dest[n, k]]), and its gradients in x, w and each rank's A."""

    G, N, D, K = 4, 9, 5, 3

    def inputs(self, p):
        g = torch.Generator().manual_seed(100 + p)
        x = torch.randn(self.N, self.D, generator=g, dtype=torch.float64)
        dest = torch.randint(self.G, (self.N, self.K), generator=g)  # repeats allowed: two experts on one rank
        w = torch.rand(self.N, self.K, generator=g, dtype=torch.float64)
        c = torch.randn(self.N, self.D, generator=g, dtype=torch.float64)
        return x, dest, w, c

    def weight(self, r):
        return torch.randn(self.D, self.D, generator=torch.Generator().manual_seed(200 + r), dtype=torch.float64)

    def check(self, node_limited, virtual_nodes):
        G, N, K = self.G, self.N, self.K
        A = [self.weight(r).requires_grad_() for r in range(G)]
        ins = [self.inputs(p) for p in range(G)]
        xs = [x.clone().requires_grad_() for x, _, _, _ in ins]
        ws = [w.clone().requires_grad_() for _, _, w, _ in ins]
        total = 0
        want_y = []
        for p, (_, dest, _, c) in enumerate(ins):
            y = sum(ws[p][:, k, None] * torch.tanh(torch.stack([xs[p][n] @ A[int(dest[n, k])] for n in range(N)]))
                    for k in range(K))
            want_y.append(y.detach())
            total = total + (y * c).sum()
        total.backward()
        nodes = [r * virtual_nodes // G for r in range(G)] if virtual_nodes else [0] * G
        results, lock = {}, threading.Lock()

        def rank_main(world):
            me = world.rank
            x, dest, w, c = self.inputs(me)
            x.requires_grad_(), w.requires_grad_()
            a = self.weight(me).requires_grad_()
            tags = me * 1000 + torch.arange(N)[:, None] * 10 + torch.arange(K)[None, :]
            rows, routed = dt.dispatch(x, dest, tags=tags, node_limited=node_limited, group=world)
            y = dt.combine(torch.tanh(rows @ a), routed, w)
            (y * c).sum().backward()
            with lock:
                results[me] = (rows.detach(), routed, y.detach(), x.grad, w.grad, a.grad)

        dt.run(rank_main, ranks=G, timeout_s=60, virtual_nodes=virtual_nodes)
        for me in range(G):
            rows, routed, y, gx, gw, ga = results[me]
            self.assertEqual(routed.node_limited, node_limited)
            # Delivery: exactly the (source, token, slot) aimed here, each row the source's token.
            want_tags = sorted(p * 1000 + n * 10 + k for p in range(G) for n in range(N) for k in range(K)
                               if int(ins[p][1][n, k]) == me)
            self.assertEqual(sorted(routed.tags.tolist()), want_tags)
            for row, tag in zip(rows, routed.tags.tolist()):
                self.assertTrue(torch.equal(row, ins[tag // 1000][0][(tag % 1000) // 10]), tag)
            # Crossings: once per remote slot on the flat path, once per (token, remote node) node-limited.
            dest = ins[me][1]
            if node_limited:
                want = len({(n, nodes[int(dest[n, k])]) for n in range(N) for k in range(K)
                            if nodes[int(dest[n, k])] != nodes[me]})
            else:
                want = sum(nodes[int(d)] != nodes[me] for d in dest.reshape(-1))
            self.assertEqual(routed.crossings, want)
            for name, got, ref in [("y", y, want_y[me]), ("dx", gx, xs[me].grad), ("dw", gw, ws[me].grad),
                                   ("dA", ga, A[me].grad)]:
                self.assertLessEqual(float((got - ref).norm() / ref.norm()), 1e-12, f"rank {me} {name}")

    def test_flat_one_node(self):
        self.check(False, 0)

    def test_flat_two_nodes(self):
        self.check(False, 2)

    def test_node_limited_two_nodes(self):
        self.check(True, 2)

    def test_node_limited_four_nodes(self):  # one rank per node: the relay is the expert's own rank
        self.check(True, 4)

    def test_node_limited_crosses_less(self):
        # The same routing on two nodes of two: the node-limited path sends fewer rows across than the flat one.
        crossings = {}
        for node_limited in (False, True):
            def rank_main(world, node_limited=node_limited):
                x, dest, _, _ = self.inputs(world.rank)
                _, routed = dt.dispatch(x, dest, node_limited=node_limited, group=world)
                t = torch.tensor([routed.crossings], dtype=torch.int64)
                world.all_reduce(t)
                crossings[node_limited] = int(t)
            dt.run(rank_main, ranks=self.G, timeout_s=60, virtual_nodes=2)
        self.assertLess(crossings[True], crossings[False])

    def test_bad_destination(self):
        def rank_main(world):
            dt.dispatch(torch.zeros(2, 3), torch.tensor([0, world.size]), group=world)
        with self.assertRaisesRegex(Exception, "destinations must be ranks 0..3"):
            dt.run(rank_main, ranks=self.G, timeout_s=60)


if __name__ == "__main__":
    unittest.main(verbosity=2)
