"""duplex.torch.Pipeline against the same model trained by plain PyTorch in one process on the same batch:
every schedule, PP in {2, 4}, DP in {1, 2}, fp64 and fp32, three optimizer steps (torch.optim.SGD with
momentum on the Pipeline's gradients); FP16's loss scale (class Fp16); and the errors a user gets for a broken
stage."""
import itertools
import threading
import unittest

import torch

import duplex
import duplex.torch as dt
from common import train_pipeline

WIDTH, ROWS = 16, 4  # activation of one microbatch: [ROWS, WIDTH]


_init = threading.Lock()  # ranks are threads: torch's global RNG must not interleave between them


def make_stages(pp, dtype, seed=3):
    """The model: pp blocks of (Linear, Tanh), the last with a Linear head; identical weights every call."""
    with _init:
        torch.manual_seed(seed)
        return _blocks(pp, dtype)


def _blocks(pp, dtype):
    blocks = []
    for s in range(pp):
        layers = [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
        if s == pp - 1:
            layers.append(torch.nn.Linear(WIDTH, 3))
        blocks.append(torch.nn.Sequential(*layers).to(dtype))
    return blocks


def batch(step, n, dtype):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n * ROWS, WIDTH, generator=g, dtype=dtype)
    y = torch.randn(n * ROWS, 3, generator=g, dtype=dtype)
    return x, y


def reference(pp, n, steps, dtype):
    """Plain PyTorch: the whole model in one process, the loss averaged over the same n microbatches."""
    blocks = make_stages(pp, dtype)
    model = torch.nn.Sequential(*blocks)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses, per_mb = [], []
    for step in range(1, steps + 1):
        x, y = batch(step, n, dtype)
        total, each = 0.0, []
        for xm, ym in zip(torch.chunk(x, n), torch.chunk(y, n)):
            loss = torch.nn.functional.mse_loss(model(xm), ym) / n
            loss.backward()
            total += float(loss.detach()) * n
            each.append(float(loss.detach()) * n)
        losses.append(total / n)
        per_mb.append(each)
        opt.step()
        opt.zero_grad()
    return losses, [list(b.parameters()) for b in blocks], per_mb


def per_rank(schedule):
    """Stages each rank holds: DualPipeV's two, interleaved 1F1B's vpp (2 in these tests), else one."""
    return 2 if schedule in ("dualpipev", "interleaved") else 1


def distributed(schedule, pp, dp, microbatches, steps, dtype):
    ranks_per_replica = pp // per_rank(schedule)
    out = {"losses": None, "params": {}, "per_mb": None}
    lock = threading.Lock()

    def rank_main(world):
        blocks = make_stages(pp, dtype)
        r = world.rank // dp
        pipe = dt.Pipeline(world, lambda s: blocks[s], schedule=schedule, pp=pp, dp=dp, microbatches=microbatches,
                           loss_fn=torch.nn.functional.mse_loss, activation_shape=(ROWS, WIDTH),
                           vpp=per_rank(schedule) if schedule == "interleaved" else 1)
        mine = pipe.modules  # the stages it asked for: [r], [r, PP-1-r] for DualPipe(V), [r, r + PP/2] interleaved
        params = [p for m in mine for p in m.parameters()]
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        per_mb = []
        losses = train_pipeline(pipe, opt, (batch(step, dp * microbatches, dtype) for step in range(1, steps + 1)),
                                per_mb)
        with lock:
            if world.rank == 0:
                out["losses"], out["per_mb"] = losses, per_mb
            for m in mine:
                out["params"][blocks.index(m)] = [p.detach().clone() for p in m.parameters()]

    dt.run(rank_main, ranks=ranks_per_replica * dp, timeout_s=120)
    return out


class Equivalence(unittest.TestCase):
    def check(self, schedule, pp, dp, dtype, tol):
        n = 2 * pp  # DualPipe needs N >= 2 PP per replica
        steps = 3
        got = distributed(schedule, pp, dp, n, steps, dtype)
        want_losses, want_params, want_per_mb = reference(pp, n * dp, steps, dtype)
        self.assertEqual(len(got["losses"]), steps)
        for s in range(steps):
            self.assertLessEqual(abs(got["losses"][s] - want_losses[s]), tol * abs(want_losses[s]), f"step {s + 1}")
            self.assertEqual(len(got["per_mb"][s]), n * dp)
            for i, (have, want) in enumerate(zip(got["per_mb"][s], want_per_mb[s])):  # the batch's order
                self.assertLessEqual(abs(have - want), tol * abs(want), f"step {s + 1} microbatch {i}")
        self.assertEqual(sorted(got["params"]), list(range(pp)))
        for b in range(pp):
            for have, want in zip(got["params"][b], want_params[b]):
                rel = float((have - want).norm() / want.norm())
                self.assertLessEqual(rel, tol, f"block {b}")

    def test_every_schedule_fp64(self):
        for schedule, pp, dp in itertools.product(["1f1b", "zb1p", "dualpipe", "dualpipev", "interleaved"], [2, 4],
                                                  [1, 2]):
            with self.subTest(schedule=schedule, pp=pp, dp=dp):
                self.check(schedule, pp, dp, torch.float64, 1e-12)

    def test_fp32(self):
        for schedule in ["zb1p", "dualpipe"]:
            with self.subTest(schedule=schedule):
                self.check(schedule, 4, 2, torch.float32, 1e-5)


class Evaluate(unittest.TestCase):
    """Pipeline.evaluate: forward and loss only; each microbatch's loss equals plain PyTorch's on the same weights,
    and nothing changes: parameters, their .grad, and the next training step."""

    def test_every_schedule(self):
        for schedule, dp in itertools.product(["1f1b", "zb1p", "dualpipe", "dualpipev"], [1, 2]):
            with self.subTest(schedule=schedule, dp=dp):
                self.check(schedule, 4, dp)

    def check(self, schedule, pp, dp):
        n, dtype = 2 * pp, torch.float64
        x, y = batch(9, n * dp, dtype)
        model = torch.nn.Sequential(*make_stages(pp, dtype))
        with torch.no_grad():
            want = [float(torch.nn.functional.mse_loss(model(a), b)) for a, b in zip(torch.chunk(x, n * dp),
                                                                                    torch.chunk(y, n * dp))]
        out, lock = {}, threading.Lock()

        def rank_main(world):
            blocks = make_stages(pp, dtype)
            pipe = dt.Pipeline(world, lambda s: blocks[s], schedule=schedule, pp=pp, dp=dp, microbatches=n,
                               loss_fn=torch.nn.functional.mse_loss, activation_shape=(ROWS, WIDTH))
            params = [p for m in pipe.modules for p in m.parameters()]
            before = [p.detach().clone() for p in params]
            mean = pipe.evaluate(x, y)
            losses = pipe.last_metrics["losses"]
            unchanged = all(torch.equal(a, p) for a, p in zip(before, params))
            no_grad = all(p.grad is None or not p.grad.any() for p in params)
            step_after = pipe.step(*batch(1, n * dp, dtype))
            pipe.close()
            with lock:
                out[world.rank] = (mean, losses, unchanged, no_grad, step_after)

        ranks = (pp // 2 if schedule == "dualpipev" else pp) * dp
        dt.run(rank_main, ranks=ranks, timeout_s=60)
        plain = distributed(schedule, pp, dp, n, 1, dtype)["losses"][0]  # the same step, no evaluate before it
        for r, (mean, losses, unchanged, no_grad, step_after) in out.items():
            self.assertEqual(len(losses), n * dp)
            for i, (have, w) in enumerate(zip(losses, want)):
                self.assertLessEqual(abs(have - w), 1e-12 * abs(w), f"rank {r} microbatch {i}")
            self.assertLessEqual(abs(mean - sum(want) / len(want)), 1e-12 * abs(mean))
            self.assertTrue(unchanged, f"rank {r}: evaluate changed a parameter")
            self.assertTrue(no_grad, f"rank {r}: evaluate left a gradient")
            self.assertEqual(step_after, plain, f"rank {r}: the step after evaluate differs")


class ZeroAdamWAndEma(unittest.TestCase):
    def test_against_torch_adamw_and_a_plain_ema(self):
        pp, dp, n, steps, decay = 2, 2, 4, 3, 0.9
        lr, wd = 0.01, 0.1
        # Plain PyTorch: AdamW with DeepSeek-V3's betas, decay only on matrices; the EMA by hand.
        blocks = make_stages(pp, torch.float64)
        model = torch.nn.Sequential(*blocks)
        groups = [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": wd},
                  {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
        ema = [p.detach().clone() for p in model.parameters()]
        for step in range(1, steps + 1):
            x, y = batch(step, n * dp, torch.float64)
            for xm, ym in zip(torch.chunk(x, n * dp), torch.chunk(y, n * dp)):
                (torch.nn.functional.mse_loss(model(xm), ym) / (n * dp)).backward()
            opt.step()
            opt.zero_grad()
            for e, p in zip(ema, model.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        want = {i: list(b.parameters()) for i, b in enumerate(blocks)}
        want_ema = dict(zip([f"stage{i}.{name}" for i, b in enumerate(blocks) for name, _ in b.named_parameters()],
                            ema))

        got, got_ema, lock = {}, {}, threading.Lock()

        def rank_main(world):
            mine = make_stages(pp, torch.float64)[world.rank // dp]
            pipe = dt.Pipeline(world, [mine], schedule="zb1p", pp=pp, dp=dp, microbatches=n,
                               loss_fn=torch.nn.functional.mse_loss, activation_shape=(ROWS, WIDTH),
                               optimizer=dt.ZeroAdamW(lr=lr, weight_decay=wd, clip=0), ema_decay=decay)
            for step in range(1, steps + 1):
                pipe.step(*batch(step, n * dp, torch.float64))
            e = pipe.ema()
            pipe.close()
            with lock:
                got[world.rank // dp] = [p.detach().clone() for p in mine.parameters()]
                got_ema.update(e)

        dt.run(rank_main, ranks=pp * dp, timeout_s=120)
        for b in range(pp):
            for have, w in zip(got[b], want[b]):
                self.assertLessEqual(float((have - w).norm() / w.norm()), 1e-12, f"block {b}")
        self.assertEqual(sorted(got_ema), sorted(want_ema))
        for name, w in want_ema.items():
            have = torch.from_numpy(got_ema[name]).reshape(w.shape)
            self.assertLessEqual(float((have - w).norm() / w.norm()), 1e-12, name)


def collect(out, blocks, mine, ema):
    """This rank's stages' parameters and buffers ("<stage>.<name>") and its EMA ("ema.<name>") into out."""
    for b in mine:
        s = blocks.index(b)
        for name, t in list(b.named_parameters()) + list(b.named_buffers()):
            out[f"{s}.{name}"] = t.detach().clone()
    out.update({f"ema.{k}": torch.from_numpy(v.copy()) for k, v in ema.items()})


class Checkpoint(unittest.TestCase):
    """Pipeline.save / Pipeline.load: 4 steps straight equal 2 steps, a save, a fresh Pipeline (new modules) that
    loads and 2 more steps — parameters, a module buffer, and the EMA bit for bit (ZeroAdamW, DualPipe, DP 2)."""

    def run_steps(self, steps, load=None, save=None):
        pp, dp, n = 2, 2, 4
        out, lock = {}, threading.Lock()

        def rank_main(world):
            blocks = make_stages(pp, torch.float64)
            for b in blocks:  # a buffer the stage updates itself: a step counter
                b.register_buffer("seen", torch.zeros(1, dtype=torch.float64))
            r = world.rank // dp
            mine = [blocks[r], blocks[pp - 1 - r]]
            pipe = dt.Pipeline(world, mine, schedule="dualpipe", pp=pp, dp=dp, microbatches=n,
                               loss_fn=torch.nn.functional.mse_loss, activation_shape=(ROWS, WIDTH),
                               optimizer=dt.ZeroAdamW(lr=0.01), ema_decay=0.9)
            start = pipe.load(load) if load else 0
            for step in range(start + 1, steps + 1):
                pipe.step(*batch(step, n * dp, torch.float64))
                for b in mine:
                    b.seen += 1
            if save:
                pipe.save(save)
            e = pipe.ema()
            pipe.close()
            with lock:
                out["start"] = start
                collect(out, blocks, mine, e)

        dt.run(rank_main, ranks=pp * dp, timeout_s=120)
        return out

    def test_resume_equals_uninterrupted(self):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            whole = self.run_steps(4)
            self.run_steps(2, save=d)
            resumed = self.run_steps(4, load=d)
            self.assertEqual(resumed.pop("start"), 2)
            whole.pop("start")
            self.assertEqual(sorted(whole), sorted(resumed))
            self.assertTrue(any(k.startswith("ema.") for k in whole))
            self.assertEqual(float(resumed["0.seen"]), 4.0)  # the buffer came back (2) and went on (+2)
            for k, w in whole.items():
                self.assertTrue(torch.equal(resumed[k], w), k)

    def run_fit(self, steps, save=None, save_every=0, keep=0, resume=None):
        """The same training through Pipeline.fit (Duplex's training loop) instead of a loop of step()."""
        pp, dp, n = 2, 2, 4
        out, lock = {}, threading.Lock()

        def rank_main(world):
            blocks = make_stages(pp, torch.float64)
            for b in blocks:
                b.register_buffer("seen", torch.zeros(1, dtype=torch.float64))
            pipe = dt.Pipeline(world, lambda s: blocks[s], schedule="dualpipe", pp=pp, dp=dp, microbatches=n,
                               loss_fn=torch.nn.functional.mse_loss, activation_shape=(ROWS, WIDTH),
                               optimizer=dt.ZeroAdamW(lr=0.01), ema_decay=0.9)
            seen = []

            def on_step(m):
                seen.append((m["step"], m["loss"]))
                for b in pipe.modules:
                    b.seen += 1

            if resume:  # a function of the step: the resumed run asks from where it continues
                data = lambda step: batch(step, n * dp, torch.float64)  # noqa: E731
            else:  # an iterable, from its start
                data = (batch(step, n * dp, torch.float64) for step in range(1, steps + 1))
            r = pipe.fit(data, steps, save=save, save_every=save_every, keep=keep, resume=resume, on_step=on_step)
            e = pipe.ema()
            pipe.close()
            with lock:
                out["result"], out["seen"] = r, seen
                collect(out, blocks, pipe.modules, e)

        dt.run(rank_main, ranks=pp * dp, timeout_s=120)
        return out

    def test_fit_saves_every_n_keeps_k_and_resumes(self):
        import os
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            stepped = self.run_steps(4)
            stepped.pop("start")
            whole = self.run_fit(4)
            self.assertEqual([s for s, _ in whole.pop("seen")], [1, 2, 3, 4])
            self.assertEqual(whole.pop("result")["steps_done"], 4)
            for k, w in stepped.items():  # fit runs the steps step() runs
                self.assertTrue(torch.equal(whole[k], w), k)
            first = self.run_fit(3, save=d, save_every=2, keep=1)
            self.assertEqual(sorted(os.listdir(d)), ["step-00000003"])  # saved at 2 and 3, the newest kept
            resumed = self.run_fit(4, resume=d)
            self.assertEqual([s for s, _ in resumed.pop("seen")], [4])
            self.assertEqual(resumed.pop("result")["start"], 3)
            for k, w in stepped.items():
                self.assertTrue(torch.equal(resumed[k], w), k)
            self.assertEqual(len(first["seen"]), 3)

    def test_a_damaged_checkpoint_is_refused_naming_the_file(self):
        import glob
        import os
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            self.run_steps(1, save=d)
            shard = sorted(glob.glob(os.path.join(d, "step-*", "rank-00001.bin")))[0]
            with open(shard, "r+b") as f:
                f.truncate(os.path.getsize(shard) - 3)
            with self.assertRaisesRegex(Exception, "rank-00001.bin: .*truncated"):
                self.run_steps(2, load=d)


class Poison(torch.nn.Module):
    """Multiplies by `scale`: NaN on the steps a test chooses (the loss then is not finite)."""

    def __init__(self):
        super().__init__()
        self.scale = 1.0

    def forward(self, x):
        return x * self.scale


class Divergence(unittest.TestCase):
    """A step that is not finite is not applied (ZeroAdamW's parameters and moments, the EMA untouched) and warns
    where it started; max_bad_steps in a row raise DivergenceError, from step() and from fit()."""

    def test_a_bad_step_is_skipped_and_reported_then_the_run_stops(self):
        import tempfile
        import warnings as w
        out, lock = {}, threading.Lock()
        with tempfile.TemporaryDirectory() as d:
            def rank_main(world):
                blocks = make_stages(2, torch.float64)
                poison = Poison()
                mine = torch.nn.Sequential(blocks[world.rank], poison) if world.rank == 1 else blocks[0]
                pipe = dt.Pipeline(world, [mine], schedule="1f1b", microbatches=2, loss_fn=torch.nn.functional.mse_loss,
                                   activation_shape=(ROWS, WIDTH), dtype=torch.float64,
                                   optimizer=dt.ZeroAdamW(lr=1e-2), ema_decay=0.5, max_bad_steps=2)
                pipe.step(*batch(1, 2, torch.float64))
                before = [p.detach().clone() for p in mine.parameters()]
                ema = pipe.ema()
                poison.scale = float("nan")
                pipe.step(*batch(2, 2, torch.float64))
                bad = dict(pipe.last_metrics)
                same = all(torch.equal(a, b) for a, b in zip(before, mine.parameters()))
                ema_same = all((ema[k] == v).all() for k, v in pipe.ema().items())
                try:
                    pipe.step(*batch(3, 2, torch.float64))
                    stopped = None
                except dt.DivergenceError as e:
                    stopped = str(e)
                poison.scale = 1.0
                good = pipe.step(*batch(4, 2, torch.float64))
                # fit: poisoned from step 6 on; saves every step; stops after 2, the last checkpoint step 5's.
                def data(step):
                    poison.scale = float("nan") if step >= 6 else 1.0
                    return batch(step, 2, torch.float64)
                try:
                    pipe.fit(data, 10, save=d, save_every=1)
                    fit_stopped = None
                except duplex.DivergenceError as e:
                    fit_stopped = str(e)
                pipe.close()
                with lock:
                    out[world.rank] = dict(bad=bad, same=same, ema_same=ema_same, stopped=stopped, good=good,
                                           fit_stopped=fit_stopped)

            with w.catch_warnings(record=True) as caught:  # both ranks' (threads share the warning filters)
                w.simplefilter("always")
                dt.run(rank_main, ranks=2, timeout_s=60)
            import os
            saved = sorted(os.listdir(d))
        for r in (0, 1):
            o = out[r]
            self.assertFalse(o["bad"]["applied"], r)
            self.assertTrue(o["same"], f"rank {r}: parameters changed by a step that was not applied")
            self.assertTrue(o["ema_same"], f"rank {r}: the EMA changed")
            self.assertIn("step 2 not applied: loss nan", o["bad"]["not_applied"])
            self.assertIn("first non-finite loss: microbatch 0", o["bad"]["not_applied"])
            self.assertEqual(sum(str(c.message) == o["bad"]["not_applied"] for c in caught), 2)  # once a rank
            self.assertIn("stopped after 2 step(s) in a row", o["stopped"] or "")
            self.assertTrue(torch.isfinite(torch.tensor(o["good"])))
            self.assertIn("stopped after 2 step(s) in a row", o["fit_stopped"] or "")
        self.assertEqual(saved[-1], "step-00000005")  # 5 applied; 6 and 7 not, neither saved
        with self.assertRaisesRegex(ValueError, "max_bad_steps"):
            dt.Pipeline(None, [], max_bad_steps=-1, loss_fn=torch.nn.functional.mse_loss, activation_shape=(1,))


class Fp16(unittest.TestCase):
    """FP16 modules: fp32 masters and a dynamic loss scale. The loss is multiplied by the scale (2^16 to start)
    before the backward and each gradient divided by it as it joins the fp32 sums, so gradients below FP16's
    smallest number survive; a step whose gradients overflow halves the scale and is skipped without counting as
    divergence."""

    def run_fp16(self, steps, loss_fn, scale=None, lr=1e-3, inputs=None):
        out, lock = {}, threading.Lock()

        def rank_main(world):
            blocks = make_stages(2, torch.float16)
            pipe = dt.Pipeline(world, [blocks[world.rank]], schedule="1f1b", microbatches=2, loss_fn=loss_fn,
                               optimizer=dt.ZeroAdamW(lr=lr, weight_decay=0.0, clip=0.0))
            if scale is not None:
                pipe.grad_scale = scale
            scales, applied = [], []
            try:
                for step in range(1, steps + 1):
                    x, y = inputs(step) if inputs else batch(step, 2, torch.float16)
                    pipe.step(x, y)
                    scales.append(pipe.last_metrics["grad_scale"])
                    applied.append(pipe.last_metrics["applied"])
            finally:
                pipe.close()
            with lock:
                out[world.rank] = dict(params=[p.detach().clone() for p in blocks[world.rank].parameters()],
                                       scales=scales, applied=applied)

        dt.run(rank_main, ranks=2, timeout_s=120)
        return out

    def test_gradients_below_fp16_survive(self):
        # The loss times 1e-6: its gradients are below FP16's smallest number (6e-8), without a scale all zero.
        tiny = lambda out, y: torch.nn.functional.mse_loss(out, y) * 1e-6  # noqa: E731
        model = torch.nn.Sequential(*make_stages(2, torch.float16))
        x, y = batch(1, 2, torch.float16)
        unscaled = torch.autograd.grad(tiny(model(x[:ROWS]), y[:ROWS]) / 2, list(model.parameters()))
        self.assertTrue(all(float(g.abs().max()) == 0 for g in unscaled[:2]), "the premise: FP16 underflows")
        # The reference: the same model, 2^16 times the loss, the gradients divided back in fp32, AdamW on fp32
        # masters (the formula written out), weights rounded from the masters.
        from test_torch_moe import adamw_reference
        params = list(model.parameters())
        masters = [p.detach().float() for p in params]
        moments = [(torch.zeros_like(m), torch.zeros_like(m)) for m in masters]
        for step in range(1, 4):
            x, y = batch(step, 2, torch.float16)
            sums = [torch.zeros_like(m) for m in masters]
            for xm, ym in zip(x.chunk(2), y.chunk(2)):
                grads = torch.autograd.grad(tiny(model(xm), ym) * (0.5 * 2.0 ** 16), params)
                for total, g in zip(sums, grads):
                    total.add_(g, alpha=2.0 ** -16)
            with torch.no_grad():
                for p, master, g, (m, v) in zip(params, masters, sums, moments):
                    adamw_reference(master, g, m, v, step, 1e-3)
                    p.copy_(master)
        want = [list(b.parameters()) for b in [model[0], model[1]]]
        got = self.run_fp16(3, tiny)
        start = [list(b.parameters()) for b in make_stages(2, torch.float16)]
        for r in range(2):
            self.assertEqual(got[r]["scales"], [2.0 ** 16] * 3)
            for have, ref, first in zip(got[r]["params"], want[r], start[r]):
                self.assertTrue(torch.equal(have, ref.detach()), f"rank {r}")
                self.assertFalse(torch.equal(have, first.detach()), f"rank {r}: the weights moved")

    def test_an_overflow_halves_the_scale_and_is_not_divergence(self):
        # 2^24 times a loss near 1 is beyond FP16's largest number: steps overflow and halve the scale until they fit;
        # more overflowed steps in a row than max_bad_steps (3) raise nothing.
        got = self.run_fp16(12, torch.nn.functional.mse_loss, scale=2.0 ** 24)
        scales, applied = got[0]["scales"], got[0]["applied"]
        overflowed = applied.index(True)
        self.assertGreater(overflowed, 3)
        self.assertEqual(scales[:overflowed + 1], [2.0 ** (24 - k) for k in range(overflowed + 1)])
        self.assertTrue(all(applied[overflowed:]))
        self.assertEqual(got[1]["scales"], scales)  # every rank decides alike

    def test_a_loss_that_is_not_finite_still_stops(self):
        nan = lambda step: (torch.full((2 * ROWS, WIDTH), float("nan"), dtype=torch.float16),  # noqa: E731
                            torch.zeros(2 * ROWS, 3, dtype=torch.float16))
        with self.assertRaisesRegex(RuntimeError, "DivergenceError: stopped after 3 step"):
            self.run_fp16(5, torch.nn.functional.mse_loss, inputs=nan)


class BadInput(unittest.TestCase):
    def run_with(self, stage_fn=None, loss_fn=torch.nn.functional.mse_loss, shape=(ROWS, WIDTH)):
        def rank_main(world):
            blocks = make_stages(2, torch.float64)
            if stage_fn:
                blocks = stage_fn(blocks)
            pipe = dt.Pipeline(world, [blocks[world.rank]], schedule="1f1b", microbatches=2, loss_fn=loss_fn,
                               activation_shape=shape, dtype=torch.float64)
            pipe.step(*batch(1, 2, torch.float64))

        dt.run(rank_main, ranks=2, timeout_s=30)

    def test_a_stage_output_of_another_shape_is_named(self):
        with self.assertRaisesRegex(RuntimeError, r"(?s)torch stage 0 .*microbatch 0: forward raised.*"
                                                  r"forward returned float64\[4, 16\], expected \[4, 8\]"):
            self.run_with(shape=(ROWS, 8))

    def test_a_boundary_of_something_else_than_tensors(self):
        class Words(torch.nn.Module):
            def forward(self, x):
                return ["not", "tensors"]
        with self.assertRaisesRegex(RuntimeError, r"(?s)torch stage 0 .*microbatch 0: forward raised.*"
                                                  r"a stage boundary carries tensors, not str"):
            self.run_with(stage_fn=lambda b: [Words(), b[1]], shape=None)

    def test_a_loss_that_is_not_a_scalar(self):
        with self.assertRaisesRegex(RuntimeError, "(?s)torch stage 1.*microbatch 0.*not a scalar"):
            self.run_with(loss_fn=lambda out, y: (out - y) ** 2)

    def test_a_module_that_raises(self):
        class Boom(torch.nn.Module):
            def forward(self, x):
                raise ArithmeticError("boom in the module")

        def swap(blocks):
            blocks[1] = Boom()
            return blocks

        with self.assertRaisesRegex(RuntimeError, "(?s)torch stage 1.*microbatch 0.*boom in the module"):
            self.run_with(stage_fn=swap)


if __name__ == "__main__":
    unittest.main(verbosity=2)
