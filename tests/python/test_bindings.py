"""The Python module against independent expectations: the published schedule numbers, the command line's own
JSON, and NumPy's arithmetic for every collective (ranks as threads of this process)."""
import json
import os
import subprocess
import sys
import unittest

import numpy as np

import duplex

DUPLEX = os.environ.get("DUPLEX_BIN", "duplex")


class Schedules(unittest.TestCase):
    def test_published_makespans(self):
        # docs/reference.md: DualPipe PP=8, N=20, F=1 B=2 W=1: 66 with F&B=3, 52 with F&B=2; 1F1B (N+PP-1)(F+B).
        p = duplex.schedule("dualpipe", pp=8, microbatches=20, cost_f=1, cost_b=2, cost_w=1, cost_fb=3)
        self.assertEqual(repr(p.makespan), "66")  # whole-number costs: int times, printed as published
        self.assertEqual(p.idle, [6] * 8)
        self.assertEqual(repr(duplex.schedule("1f1b", pp=4, microbatches=8, cost_f=1.5).makespan), "38.5")
        self.assertEqual(duplex.schedule("dualpipe", pp=8, microbatches=20, cost_fb=2).makespan, 52)
        self.assertEqual(duplex.schedule("1f1b", pp=8, microbatches=20).makespan, (20 + 8 - 1) * 3)
        self.assertEqual(p.peak_activations, [8, 8, 8, 9, 9, 8, 8, 8])

    def test_instructions_cover_every_chunk(self):
        p = duplex.schedule("dualpipev", pp=4, microbatches=8)
        self.assertEqual(p.num_ranks, 2)
        forwards = [f for rank in p.instructions for op, f, b in rank if f is not None]
        self.assertEqual(sorted(forwards), sorted((mb, s, 0) for mb in range(8) for s in range(4)))
        self.assertIn("<svg", p.svg)

    def test_bad_layout_names_the_flag(self):
        with self.assertRaisesRegex(ValueError, "--pp.*even"):
            duplex.schedule("dualpipe", pp=3, microbatches=8)
        with self.assertRaisesRegex(ValueError, "not a schedule|schedule"):
            duplex.schedule("gpipe", pp=4, microbatches=8)


class Simulate(unittest.TestCase):
    def test_equals_the_command_line(self):
        args = dict(model="deepseek-v3", cluster="h800x2048", pp=16, ep=64, schedule="dualpipe")
        mine = duplex.simulate(**args)
        cli = json.loads(subprocess.run([DUPLEX, "simulate", "--pp", "16", "--ep", "64", "--schedule", "dualpipe",
                                         "--json", "-"], capture_output=True, text=True, check=True).stdout)
        for key in ["step_time_s", "pipeline_s", "bubble_fraction", "mfu", "memory_per_gpu_bytes", "stages"]:
            self.assertEqual(mine[key], cli[key], key)
        self.assertTrue(mine["fits"])

    def test_impossible_layout(self):
        with self.assertRaisesRegex(ValueError, "--ep"):
            duplex.simulate(pp=16, ep=7)


class CommBench(unittest.TestCase):
    def test_rows_have_the_command_lines_fields(self):
        rows = duplex.commbench(op="alltoall", ranks=4, sizes=[1 << 10, 1 << 20], iters=3, warmup=1)
        args = ["commbench", "--ranks", "4", "--op", "alltoall", "-b", "1K", "-e", "1M", "-f", "1024", "-n", "3",
                "-w", "1", "--no-ceiling", "--json", "-"]
        cli = json.loads(subprocess.run([DUPLEX] + args, capture_output=True, text=True, check=True).stdout)["rows"]
        self.assertEqual([r["size"] for r in rows], [1 << 10, 1 << 20])
        self.assertEqual([r["size"] for r in cli], [1 << 10, 1 << 20])
        for mine, theirs in zip(rows, cli):
            self.assertEqual(sorted(mine), sorted(theirs))
            self.assertEqual((mine["count"], mine["type"], mine["wrong"]), (theirs["count"], theirs["type"], 0))
            self.assertGreater(mine["busbw_gbs"], 0)
            # nccl-tests' all-to-all bus bandwidth: algbw (size / time) x (n - 1) / n.
            self.assertAlmostEqual(mine["busbw_gbs"], mine["size"] / (mine["time_us"] * 1e3) * 3 / 4, places=6)

    def test_bad_input_is_refused(self):
        with self.assertRaisesRegex(ValueError, "sizes"):
            duplex.commbench(sizes=[])
        with self.assertRaisesRegex(ValueError, "op|gather"):
            duplex.commbench(op="gather")


class Collectives(unittest.TestCase):
    def run_ranks(self, n, fn):
        out = {}

        def body(world):
            out[world.rank] = fn(world)

        duplex.launch(body, ranks=n, timeout_s=60)
        return [out[r] for r in range(n)]

    def test_every_collective_against_numpy(self):
        n = 4
        rng = np.random.default_rng(5)
        data = [rng.standard_normal(12) for _ in range(n)]

        def fn(world):
            r = world.rank
            x = data[r].copy()
            world.all_reduce(x)  # in place: the caller's array holds the sum
            g = np.zeros(n * 12)
            world.all_gather(data[r], g)
            a = np.zeros(12)
            world.all_to_all(data[r], a)
            rs = np.zeros(3)
            world.reduce_scatter(data[r], rs)
            ring = np.zeros(12)
            if r % 2 == 0:
                world.send(data[r], (r + 1) % n, tag=7)
                world.recv(ring, (r - 1) % n, tag=7)
            else:
                world.recv(ring, (r - 1) % n, tag=7)
                world.send(data[r], (r + 1) % n, tag=7)
            sub = world.split(r % 2, -r)
            return x, g, a, rs, ring, sub.rank, sub.size

        res = self.run_ranks(n, fn)
        total = sum(data[q] for q in range(n))
        for r, (x, g, a, rs, ring, sub_rank, sub_size) in enumerate(res):
            np.testing.assert_allclose(x, total, rtol=1e-15)
            np.testing.assert_array_equal(g, np.concatenate(data))
            np.testing.assert_array_equal(a, np.concatenate([data[q][3 * r:3 * r + 3] for q in range(n)]))
            np.testing.assert_allclose(rs, total[3 * r:3 * r + 3], rtol=1e-15)
            np.testing.assert_array_equal(ring, data[(r - 1) % n])
            self.assertEqual(sub_size, 2)
            self.assertEqual(sub_rank, 1 - r // 2)  # key -r: the higher world rank first

    def test_expert_path_and_relays_come_from_the_plan(self):
        # 6 ranks on 2 virtual nodes: ranks 0-2 on node 0, 3-5 on node 1; the relay of rank r for destination d is
        # the rank on d's node with r's local index.
        out = {}

        def body(world):
            out[world.rank] = (world.relays, world.expert_path(), world.expert_path(False))

        duplex.launch(body, ranks=6, virtual_nodes=2, timeout_s=60)
        for r in range(6):
            relays, path, flat = out[r]
            self.assertEqual(relays, [r % 3] * 3 + [3 + r % 3] * 3)
            self.assertEqual((path, flat), ("node-limited", "flat"))
        one = self.run_ranks(2, lambda world: world.expert_path())
        self.assertEqual(one, ["flat", "flat"])

    def test_a_rank_that_raises_stops_the_others_and_is_named(self):
        def fn(world):
            if world.rank == 2:
                raise KeyError("boom")
            world.barrier()

        with self.assertRaisesRegex(RuntimeError, "(?s)rank 2.*KeyError"):
            duplex.launch(fn, ranks=3, timeout_s=30)

    def test_wrong_sizes_are_refused(self):
        def fn(world):
            with self.assertRaisesRegex(ValueError, "all_gather"):
                world.all_gather(np.zeros(3), np.zeros(5))
            with self.assertRaisesRegex(ValueError, "dtype"):
                world.all_reduce(np.zeros(3, dtype=np.complex64))
            return True

        self.assertEqual(self.run_ranks(2, fn), [True, True])


class Import(unittest.TestCase):
    def test_duplex_before_torch(self):
        # torch's wheel needs its own NCCL (the toolkit's, which the module links, is older under the same soname).
        import importlib.util
        if importlib.util.find_spec("torch") is None:
            self.skipTest("torch is not installed")
        run = subprocess.run([sys.executable, "-c", "import duplex, torch, duplex.torch; print(torch.ones(2).sum())"],
                             capture_output=True, text=True, env=os.environ)
        self.assertEqual(run.returncode, 0, run.stderr[-2000:])


if __name__ == "__main__":
    unittest.main(verbosity=2)
