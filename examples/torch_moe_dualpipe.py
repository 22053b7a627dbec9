"""A small MoE transformer in plain PyTorch, trained with Duplex: DualPipe over 4 pipeline stages x 2 data-parallel
replicas, the routed experts of every MoE layer spread over an expert-parallel group of 2 inside data parallelism
(8 ranks). Tokens reach their experts through duplex.torch.dispatch and come back through combine; inside each
DualPipe F&B pair, one half's exchange waits overlap the other half's compute. Prints the loss and the share of
communication time hidden under compute.

    python examples/torch_moe_dualpipe.py                  # 8 in-process ranks
    mpirun -np 8 python examples/torch_moe_dualpipe.py --backend mpi
"""
import argparse
import math
import threading

import torch

import duplex
import duplex.torch as dt

VOCAB, WIDTH, SEQ, SEQS = 64, 32, 16, 4  # a microbatch: SEQS sequences of SEQ tokens
EXPERTS, TOP_K = 8, 2


class Block(torch.nn.Module):
    """Pre-norm causal self-attention, then a top-K MoE (softmax gates over the chosen experts) with one shared
    expert. With ep > 1 only this rank's experts live here and tokens travel to them."""

    def __init__(self, embed=False, head=False):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH) if embed else None
        self.norm1, self.norm2 = torch.nn.LayerNorm(WIDTH), torch.nn.LayerNorm(WIDTH)
        self.qkv, self.proj = torch.nn.Linear(WIDTH, 3 * WIDTH), torch.nn.Linear(WIDTH, WIDTH)
        self.router = torch.nn.Linear(WIDTH, EXPERTS)
        self.shared = torch.nn.Sequential(torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.GELU(),
                                          torch.nn.Linear(2 * WIDTH, WIDTH))
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.GELU(),
                                                               torch.nn.Linear(2 * WIDTH, WIDTH))
                                           for _ in range(EXPERTS))
        self.head = torch.nn.Linear(WIDTH, VOCAB) if head else None
        self.first, self.per = 0, EXPERTS

    def keep_experts(self, ep_rank, ep_size):
        self.per = EXPERTS // ep_size
        self.first = ep_rank * self.per
        kept = list(self.experts)[self.first:self.first + self.per]
        self.experts = dt.mark_experts(torch.nn.ModuleList(kept))

    def moe(self, h):
        probs = torch.softmax(self.router(h), dim=-1)
        gate, eid = torch.topk(probs, TOP_K, dim=-1)
        gate = gate / gate.sum(-1, keepdim=True)
        if self.per == EXPERTS:  # every expert here
            rows, flat = h.repeat_interleave(TOP_K, dim=0), eid.reshape(-1)
            out = torch.zeros_like(rows)
            for e, expert in enumerate(self.experts):
                out[flat == e] = expert(rows[flat == e])
            return self.shared(h) + (out.reshape(-1, TOP_K, WIDTH) * gate[..., None]).sum(1)
        # One row per (token, expert) reaches the expert's rank (node-limited when the EP group spans nodes); the
        # tags say which expert each row is for; combine sums gate * output per token.
        got, routed = dt.dispatch(h, eid // self.per, tags=eid)
        local = routed.tags - self.first
        out_here = torch.zeros_like(got)
        for j, expert in enumerate(self.experts):
            out_here[local == j] = expert(got[local == j])
        return self.shared(h) + dt.combine(out_here, routed, gate)

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        b, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        x = x + self.moe(self.norm2(x).reshape(b * s, w)).reshape(b, s, w)
        return self.head(x) if self.head is not None else x


def batch(step, sequences):
    """Sequences where each token is a fixed function of the two before it: attention has something to find."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(VOCAB, (sequences, SEQ + 1), generator=g)
    for t in range(2, SEQ + 1):
        x[:, t] = (3 * x[:, t - 1] + x[:, t - 2]) % VOCAB
    return x[:, :-1], x[:, 1:]


def loss_fn(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="inproc")
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8, help="per replica (DualPipe: at least 2 PP)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--virtual-nodes", type=int, default=0,
                    help="pretend the ranks sit on this many nodes (in-process): EP groups that span nodes take the "
                         "node-limited path")
    a = ap.parse_args()
    init = threading.Lock()

    def rank_main(world):
        with init:  # in-process ranks are threads: one at a time through torch's global RNG
            torch.manual_seed(0)
            blocks = [Block(embed=s == 0, head=s == a.pp - 1) for s in range(a.pp)]
        r, d = world.rank // a.dp, world.rank % a.dp
        mine = [blocks[s] for s in duplex.stages_of_rank("dualpipe", a.pp, r)]  # stages r and PP-1-r
        if a.ep > 1:
            for b in mine:
                b.keep_experts(d % a.ep, a.ep)
        pipe = dt.Pipeline(world, mine, schedule="dualpipe", pp=a.pp, dp=a.dp, ep=a.ep, microbatches=a.microbatches,
                           loss_fn=loss_fn)
        opt = torch.optim.AdamW([p for b in mine for p in b.parameters()], lr=3e-3)
        for step in range(1, a.steps + 1):
            loss = pipe.step(*batch(step, a.dp * a.microbatches * SEQS))
            opt.step()
            opt.zero_grad()
            m = pipe.last_metrics
            if world.rank == 0 and (step == 1 or step % 10 == 0):
                hidden = m["comm_hidden_fraction"]
                print(f"step {step:3d}  loss {loss:.4f} (uniform {math.log(VOCAB):.2f})  step {1e3 * m['step_time_s']:6.1f} "
                      f"ms  bubble {100 * m['bubble_fraction']:4.1f}%  comm hidden {100 * hidden:4.1f}%", flush=True)
        pipe.close()

    print(f"# MoE transformer: DualPipe PP={a.pp} x DP={a.dp}, {EXPERTS} experts top-{TOP_K} over EP={a.ep}",
          flush=True)
    duplex.launch(rank_main, ranks=a.pp * a.dp, backend=a.backend, timeout_s=300,
                  virtual_nodes=a.virtual_nodes)


if __name__ == "__main__":
    main()
