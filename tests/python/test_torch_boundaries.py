"""Several tensors between stages, and shapes that change every step: a model whose stages pass (hidden, positions,
mask) — float, int64 and bool — with a sequence length that changes from step to step, its first stage fed a dict
of inputs, trained through duplex.torch under every schedule, PP in {2, 4}, DP in {1, 2}, equal to the whole model
in plain PyTorch on the same batches (fp64: losses and parameters after three SGD steps within 1e-12). And the
boundary format on its own: every dtype, None, dicts, empty tensors, a buffer that is not one."""
import threading
import unittest

import torch

import duplex
import duplex.torch as dt
from duplex import _boundary
from common import train_pipeline

W, VOCAB, SEQS = 8, 11, 2  # sequences per microbatch
_init = threading.Lock()


class Block(torch.nn.Module):
    """(hidden, positions, mask) -> the same three; hidden += mask * tanh(Linear(hidden + position embedding)). The
    first block embeds tokens given as keyword arguments; the last returns logits."""

    def __init__(self, first, last):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, W) if first else None
        self.pos = torch.nn.Embedding(32, W)
        self.lin = torch.nn.Linear(W, W)
        self.head = torch.nn.Linear(W, VOCAB) if last else None

    def forward(self, hidden=None, positions=None, mask=None, tokens=None):
        if self.embed is not None:
            hidden = self.embed(tokens)
            mask = tokens != 0  # token 0 is padding
        h = hidden + mask.unsqueeze(-1) * torch.tanh(self.lin(hidden + self.pos(positions)))
        if self.head is not None:
            return self.head(h), mask
        return h, positions, mask


def make_blocks(pp, seed=11):
    with _init:
        torch.manual_seed(seed)
        return [Block(s == 0, s == pp - 1).double() for s in range(pp)]


def loss_fn(out, targets):
    logits, mask = out
    each = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
    return (each * mask.reshape(-1)).sum() / mask.sum()


def batch(step, n):
    """n microbatches of SEQS sequences; the sequence length changes every step."""
    seq = 4 + (step * 3) % 5
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(VOCAB, (n * SEQS, seq), generator=g)
    positions = torch.arange(seq).repeat(n * SEQS, 1)
    return {"tokens": tokens, "positions": positions}, (tokens * 3 + 1) % VOCAB


class SeveralTensors(unittest.TestCase):
    def test_every_layout(self):
        for schedule in ["1f1b", "zb1p", "dualpipe", "dualpipev"]:
            for pp, dp in [(2, 1), (4, 2)]:
                with self.subTest(schedule=schedule, pp=pp, dp=dp):
                    self.check(schedule, pp, dp)

    def check(self, schedule, pp, dp, steps=3):
        n = 2 * pp  # DualPipe's minimum
        blocks = make_blocks(pp)
        model = torch.nn.ModuleList(blocks)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        want_losses, lengths = [], set()
        for step in range(1, steps + 1):
            x, y = batch(step, n * dp)
            lengths.add(x["tokens"].shape[1])
            total = 0.0
            for i in range(n * dp):
                xs = {k: v.chunk(n * dp)[i] for k, v in x.items()}
                out = blocks[0](**xs)
                for b in blocks[1:]:
                    out = b(*out)
                loss = loss_fn(out, y.chunk(n * dp)[i]) / (n * dp)
                loss.backward()
                total += float(loss)
            want_losses.append(total)
            opt.step()
            opt.zero_grad()
        self.assertEqual(len(lengths), steps, "the sequence length changes every step")
        want = {f"{s}.{k}": v.detach() for s, b in enumerate(blocks) for k, v in b.named_parameters()}

        got, losses, lock = {}, {}, threading.Lock()

        def rank_main(world):
            mine_all = make_blocks(pp)
            mine = [mine_all[s] for s in duplex.stages_of_rank(schedule, pp, world.rank // dp)]
            pipe = dt.Pipeline(world, mine, schedule=schedule, pp=pp, dp=dp, microbatches=n, loss_fn=loss_fn)
            opt = torch.optim.SGD([p for m in mine for p in m.parameters()], lr=0.2)
            mine_losses = train_pipeline(pipe, opt, (batch(step, n * dp) for step in range(1, steps + 1)))
            with lock:
                if world.rank == 0:
                    losses["l"] = mine_losses
                for m in mine:
                    for k, v in m.named_parameters():
                        got[f"{mine_all.index(m)}.{k}"] = v.detach().clone()

        ranks = (pp // 2 if schedule == "dualpipev" else pp) * dp
        dt.run(rank_main, ranks=ranks, timeout_s=120)
        for s in range(steps):
            self.assertLessEqual(abs(losses["l"][s] - want_losses[s]), 1e-12 * want_losses[s], f"step {s + 1}")
        self.assertEqual(sorted(got), sorted(want))
        for k, v in want.items():
            self.assertLessEqual(float((got[k] - v).norm() / v.norm()), 1e-12, k)


class Format(unittest.TestCase):
    def test_round_trip_of_every_dtype(self):
        leaves = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5).to(torch.bfloat16), None,
                  torch.randn(2, 1, 3).half(), torch.arange(7), torch.arange(4, dtype=torch.int32),
                  torch.tensor([True, False, True]), torch.zeros(0, 4), torch.randn(()),
                  torch.randint(0, 255, (9,), dtype=torch.uint8), torch.randn(2, 2).float()]
        back, structure = _boundary.unpack(_boundary.pack(*_boundary.flatten(tuple(leaves))))
        self.assertEqual(structure[0], _boundary._TUPLE)
        self.assertEqual(len(back), len(leaves))
        for a, b in zip(leaves, back):
            if a is None:
                self.assertIsNone(b)
            else:
                self.assertEqual((a.dtype, a.shape), (b.dtype, b.shape))
                self.assertTrue(torch.equal(a, b))

    def test_dict_keys_and_order(self):
        value = {"hidden": torch.ones(2, 3), "positions": torch.arange(3), "attention_mask": torch.ones(3).bool()}
        back = _boundary.rebuild(*_boundary.unpack(_boundary.pack(*_boundary.flatten(value))))
        self.assertEqual(list(back), list(value))
        for k in value:
            self.assertTrue(torch.equal(back[k], value[k]), k)

    def test_repeated_boundaries_reuse_headers_without_mixing_them(self):
        # pack and unpack keep what they built from a boundary seen before: the same shapes in other dtypes, other
        # shapes in the same dtypes, a tuple and a dict of the same leaves, and keys that differ, must each come
        # back as themselves, every time (a cache keyed on too little hands one boundary another's layout).
        values = [torch.randn(4, 6), torch.randn(4, 6).double(), torch.randn(4, 6).bfloat16(),
                  torch.arange(24).view(4, 6),
                  torch.randn(6, 4), (torch.randn(4, 6), torch.arange(4)),
                  {"x": torch.randn(4, 6), "p": torch.arange(4)},
                  {"y": torch.randn(4, 6), "p": torch.arange(4)}, (torch.arange(4), torch.randn(4, 6))]
        for _ in range(3):
            for value in values:
                back = _boundary.rebuild(*_boundary.unpack(_boundary.pack(*_boundary.flatten(value))))
                if isinstance(value, torch.Tensor):
                    value, back = {"": value}, {"": back}
                elif isinstance(value, tuple):
                    value, back = dict(enumerate(value)), dict(enumerate(back))
                self.assertEqual(list(back), list(value))
                for k in value:
                    self.assertEqual((back[k].dtype, back[k].shape), (value[k].dtype, value[k].shape), k)
                    self.assertTrue(torch.equal(back[k], value[k]), k)

    def test_a_buffer_that_is_not_one(self):
        with self.assertRaisesRegex(ValueError, "without Duplex's header"):
            _boundary.unpack(torch.zeros(64, dtype=torch.uint8))


if __name__ == "__main__":
    unittest.main(verbosity=2)
