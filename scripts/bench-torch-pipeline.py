#!/usr/bin/env python3
"""duplex.torch DualPipeV against torch.distributed.pipelining.ScheduleDualPipeV on the same modules and
microbatches, side by side in one run (CPU): torch with one process per rank (gloo), Duplex with one process per
rank (UCX; the processes torchrun would start) and with in-process ranks; each round also times the compute floor
(one rank's module calls alone, B and W in one pass: what no schedule can go below; and the same with every rank
computing at once in its own process, as in a pipeline's steady state: what the ranks can reach together on this
machine). Then the executor's own overhead per instruction (the same pipeline with modules too small to compute
anything), as processes and in-process.

    .venv/bin/python scripts/bench-torch-pipeline.py [--width 512] [--stages 4] [--microbatches 8] [--steps 6]
    .venv/bin/python scripts/bench-torch-pipeline.py --width 16 --no-overhead   # where the schedulers' cost shows
    .venv/bin/python scripts/bench-torch-pipeline.py --profile-calls    # where the width-4 run's time goes
    .venv/bin/python scripts/bench-torch-pipeline.py --split-backward   # B and W three ways, one stage
    .venv/bin/python scripts/bench-torch-pipeline.py --steal --steps 12  # each step beside the CPU time the VM lost
Needs PYTHONPATH=build/python (make bench sets it). Both sides use one intra-op thread per rank.
--profile-calls runs only the width-4 Duplex pipeline, with every method of its Python stages and
torch.autograd.grad timed by the calling thread's CPU time (time.thread_time: a thread waiting for the GIL
counts nothing), and prints the CPU time per call after the warm-up step.
"""
import argparse
import os
import statistics
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def make_blocks(stages, width, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                torch.nn.Tanh()) for _ in range(stages)]


def batch(step, rows, width):
    g = torch.Generator().manual_seed(step)
    return torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g)


def torch_rank(rank, a, port, out):
    torch.set_num_threads(1)
    from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV
    import duplex  # the same placement (stages r and PP-1-r) as the Duplex side
    ranks = a.stages // 2
    dist.init_process_group("gloo", rank=rank, world_size=ranks, init_method=f"tcp://127.0.0.1:{port}")
    blocks = make_blocks(a.stages, a.width)
    stages = [PipelineStage(blocks[s], s, a.stages, torch.device("cpu"))
              for s in duplex.stages_of_rank("dualpipev", a.stages, rank)]
    sched = ScheduleDualPipeV(stages, a.microbatches, loss_fn=torch.nn.functional.mse_loss)
    times = []
    for step in range(1, a.steps + 1):
        x, y = batch(step, a.microbatches * a.rows, a.width)
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            losses = []
            sched.step(x, target=y, losses=losses)
        else:
            sched.step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def duplex_steps(world, a, blocks, width, times):
    """This rank's share of the Duplex run: a.steps steps of DualPipeV; rank 0 appends each step's time (with --steal,
    (time, ms of CPU time stolen from the machine meanwhile))."""
    import duplex.torch as dt
    pipe = dt.Pipeline(world, lambda s: blocks[s], schedule="dualpipev", pp=a.stages, microbatches=a.microbatches,
                       loss_fn=torch.nn.functional.mse_loss)
    with_steal = getattr(a, "steal", False)
    for step in range(1, a.steps + 1):
        world.barrier()
        t0, s0 = time.perf_counter(), stolen_ms() if with_steal else 0
        pipe.step(*batch(step, a.microbatches * a.rows, width))
        world.barrier()
        if world.rank == 0:
            t = time.perf_counter() - t0
            times.append((t, stolen_ms() - s0) if with_steal else t)
    pipe.close()


def duplex_run(a, width, times=None):
    """Duplex with in-process ranks (threads of this process)."""
    import duplex
    torch.set_num_threads(1)
    blocks = make_blocks(a.stages, width)
    times = [] if times is None else times
    duplex.launch(lambda world: duplex_steps(world, a, blocks, width, times), ranks=a.stages // 2, timeout_s=600)
    return times, instructions_per_rank(a)


def rank_environment(rank, a, port):
    """The variables torchrun would set for Duplex's launch (rank, world size, the store's address on `port`)."""
    os.environ.update(DUPLEX_RANK=str(rank), DUPLEX_WORLD_SIZE=str(a.stages // 2),
                      DUPLEX_STORE_ADDR=f"127.0.0.1:{port}")


def stolen_ms():
    """CPU time the hypervisor gave to others (all of this machine's CPUs, /proc/stat's steal), in ms."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) * 1000.0 / os.sysconf("SC_CLK_TCK")


def steal(a):
    """Each step of duplex.torch as processes (duplex_process) beside the CPU time the VM lost during it: on a shared
    VM a stolen tick on either vCPU stalls both ranks of a pipeline, which a plain loop of the same calls barely
    notices."""
    rows = in_processes(duplex_process, a, a.width)[1:]
    print(f"# DualPipeV, {a.stages} stages on {a.stages // 2} processes, width {a.width}: "
          "step ms, stolen ms (all CPUs)")
    for t, s in rows:
        print(f"{1e3 * t:8.1f} {s:6.0f}")
    for name, part in (("without", [t for t, s in rows if s == 0]), ("with", [t for t, s in rows if s > 0])):
        if part:
            median = 1e3 * statistics.median(part)
            print(f"median step {name} stolen time: {median:.1f} ms ({len(part)} of {len(rows)})")


def duplex_process(rank, a, width, port, out):
    """Duplex with one rank per process, as torchrun starts them (the UCX backend, the store on `port`)."""
    torch.set_num_threads(1)
    rank_environment(rank, a, port)
    import duplex
    times = []
    duplex.launch(lambda world: duplex_steps(world, a, make_blocks(a.stages, width), width, times), backend="ucx",
                  timeout_s=600)
    if rank == 0:
        out.put(times)


def in_processes(target, a, *args):
    """Runs target(rank, a, *args, port, queue) in a.stages / 2 spawned processes; rank 0's result."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29000 + (os.getpid() + len(args) * 17) % 1000
    procs = [ctx.Process(target=target, args=(r, a) + args + (port, out)) for r in range(a.stages // 2)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join()
    return result


def floor_process(rank, a, width, barrier, out):
    """module_work(one_pass) of `rank`'s stages, started with the other ranks' (barrier): seconds per step."""
    out.put((rank, module_work(a, width, one_pass=True, rank=rank, barrier=barrier)))


def concurrent_floor(a, width):
    """The compute floor with every rank computing at once, as in a pipeline's steady state: each rank's module
    calls (B and W in one pass) in its own process, all started together; the slowest rank's seconds per step. On a
    machine whose cores share a physical core or its memory (a VM's vCPUs), this is what two ranks can reach."""
    ctx = mp.get_context("spawn")
    out, barrier = ctx.Queue(), ctx.Barrier(a.stages // 2)
    procs = [ctx.Process(target=floor_process, args=(r, a, width, barrier, out)) for r in range(a.stages // 2)]
    for p in procs:
        p.start()
    times = [out.get(timeout=600)[1] for _ in procs]
    for p in procs:
        p.join()
    return max(times)


def module_work(a, width, one_pass=False, rank=0, barrier=None):
    """What one rank's Python stages ask of torch in a step, done by plain PyTorch in a loop on one thread: for each of
    its two stages and every microbatch, the forward with a graph, the input gradient (B) and the weight gradients (W)
    — the same calls a duplex.torch stage makes, without the executor. Seconds per step (median of a.steps).
    one_pass: B and W in one backward pass for every microbatch — the least computing any schedule can do for a step
    of this rank (the compute floor: no bubble, no transfers, no split)."""
    import duplex
    torch.set_num_threads(1)
    blocks = make_blocks(a.stages, width)
    mine = [blocks[s] for s in duplex.stages_of_rank("dualpipev", a.stages, rank)]
    times = []
    if barrier is not None:
        barrier.wait()
    for step in range(1, a.steps + 1):
        x, y = batch(step, a.microbatches * a.rows, width)
        t0 = time.perf_counter()
        for xm, ym in zip(x.chunk(a.microbatches), y.chunk(a.microbatches)):
            for m in mine:
                inp = xm.detach().requires_grad_(True)
                out = m(inp)
                params = list(m.parameters())
                if one_pass:
                    torch.autograd.grad(out, [inp] + params, torch.ones_like(out))
                    continue
                (dx,) = torch.autograd.grad(out, [inp], torch.ones_like(out), retain_graph=True)
                torch.autograd.grad(out, params, torch.ones_like(out))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def instructions_per_rank(a):
    import duplex
    plan = duplex.schedule("dualpipev", pp=a.stages, microbatches=a.microbatches)
    return max(len(rank) for rank in plan.instructions)


def profile_calls(a):
    """CPU time per call of each Python stage method (and of torch.autograd.grad inside them), width-4 modules."""
    import collections
    import duplex.torch as dt
    spent, calls, lock = collections.Counter(), collections.Counter(), threading.Lock()
    counting = [False]

    def timed(name, f):
        def run(*args, **kwargs):
            t = time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                if counting[0]:
                    with lock:
                        spent[name] += time.thread_time() - t
                        calls[name] += 1
        return run

    for name in ["forward", "backward_input", "backward_weight", "loss", "activation", "state", "zero_grad"]:
        setattr(dt._TorchStage, name, timed(name, getattr(dt._TorchStage, name)))
    for name in ["_call", "_received", "_send", "_input_grads", "_graph"]:
        setattr(dt._TorchStage, name, timed(f"  {name}", getattr(dt._TorchStage, name)))
    torch.autograd.grad = timed("  torch.autograd.grad", torch.autograd.grad)
    steps = a.steps

    class Counting(list):  # duplex_run appends each step's time on rank 0: start counting after the warm-up
        def append(self, t):
            super().append(t)
            counting[0] = True

    times, instructions = duplex_run(a, 4, Counting())
    counted = steps - 1
    print(f"# width-4 DualPipeV, {a.stages} stages on {a.stages // 2} in-process ranks, {a.microbatches} microbatches; "
          f"steps {1e3 * statistics.median(times[1:]):.2f} ms (median); "
          "CPU time per call, all ranks, after the warm-up:")
    for name in sorted(spent, key=lambda n: -spent[n]):
        print(f"{name:24s} {calls[name] / counted:6.1f} calls/step  {1e6 * spent[name] / calls[name]:8.1f} us/call  "
              f"{1e3 * spent[name] / counted:7.2f} ms/step")


def split_backward(a):
    """CPU time of one stage's backward split into B and W three ways, on one thread: B then a second full pass for
    W (duplex.torch below the threshold), B keeping the branch points' gradients then W from them (SplitBackward),
    and one pass for both (no split: the floor)."""
    from duplex._backward import SplitBackward
    torch.set_num_threads(1)
    for width, layers in ((a.width, 2), (a.width, 4), (4, 2)):
        m = torch.nn.Sequential(*[x for _ in range(layers) for x in (torch.nn.Linear(width, width), torch.nn.Tanh())])
        params, x = list(m.parameters()), torch.randn(a.rows, width)

        def graph():
            xi = x.detach().requires_grad_(True)
            y = m(xi)
            return xi, y, torch.ones_like(y)

        def second_pass():
            xi, y, g = graph()
            torch.autograd.grad(y, [xi], g, retain_graph=True)
            torch.autograd.grad(y, params, g)

        def from_branch_points():
            xi, y, g = graph()
            split = SplitBackward.plan([y], [xi], params)
            split.backward_input([g])
            split.backward_weight()

        def one_pass():
            xi, y, g = graph()
            torch.autograd.grad(y, [xi] + params, g)

        cells = []
        for name, f in (("B + second pass", second_pass), ("B + W from branch points", from_branch_points),
                        ("one pass (no split)", one_pass)):
            for _ in range(10):
                f()
            runs = []
            for _ in range(9):
                t = time.thread_time()
                for _ in range(10):
                    f()
                runs.append((time.thread_time() - t) / 10)
            cells.append(f"{name} {1e6 * statistics.median(runs):9.1f} us")
        print(f"{layers} x Linear({width}) + tanh, {a.rows} rows, forward + backward: " + "  ".join(cells))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rows", type=int, default=64, help="rows per microbatch")
    ap.add_argument("--stages", type=int, default=4, help="model stages (DualPipeV: on stages/2 ranks)")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="the first is a warm-up; the median of the rest counts")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the three runs back to back (a ratio within a round shares the machine's state)")
    ap.add_argument("--no-overhead", action="store_true",
                    help="skip the width-4 overhead lines after the rounds (when --width is itself small)")
    ap.add_argument("--profile-calls", action="store_true", help="only: where the width-4 Duplex run's time goes")
    ap.add_argument("--steal", action="store_true",
                    help="only: each Duplex-as-processes step beside the CPU time the VM lost (/proc/stat steal)")
    ap.add_argument("--split-backward", action="store_true",
                    help="only: a stage's B and W three ways (second pass, from branch points, one pass), one thread")
    a = ap.parse_args()
    if a.profile_calls:
        return profile_calls(a)
    if a.split_backward:
        return split_backward(a)
    if a.steal:
        return steal(a)
    print(f"# DualPipeV, {a.stages} stages on {a.stages // 2} ranks, {a.microbatches} microbatches of "
          f"{a.rows} x {a.width}, CPU, one thread per rank; {a.rounds} round(s) of torch, duplex as processes, duplex "
          f"in-process, back to back (median step of each, ms)", flush=True)
    ratios = {"processes": [], "in-process": []}
    for r in range(1, a.rounds + 1):
        t_torch = statistics.median(in_processes(torch_rank, a)[1:])
        t_proc = statistics.median(in_processes(duplex_process, a, a.width)[1:])
        t_thread = statistics.median(duplex_run(a, a.width)[0][1:])
        floor = module_work(a, a.width, one_pass=True)
        both = concurrent_floor(a, a.width)
        ratios["processes"].append(t_proc / t_torch)
        ratios["in-process"].append(t_thread / t_torch)
        print(f"round {r}: torch ScheduleDualPipeV (gloo, processes) {1e3 * t_torch:7.2f}  duplex.torch (ucx, "
              f"processes) {1e3 * t_proc:7.2f} ({t_proc / t_torch:.3f})  duplex.torch (in-process) "
              f"{1e3 * t_thread:7.2f} ({t_thread / t_torch:.3f}); compute floor {1e3 * floor:7.2f} (torch "
              f"{t_torch / floor:.2f}x it, duplex {t_proc / floor:.2f}x / {t_thread / floor:.2f}x), with every rank "
              f"computing at once {1e3 * both:7.2f} (torch {t_torch / both:.2f}x, duplex {t_proc / both:.2f}x / "
              f"{t_thread / both:.2f}x)", flush=True)
    for name, rs in ratios.items():
        print(f"duplex / torch, {name}: median {statistics.median(rs):.3f} over {len(rs)} round(s) "
              f"(range {min(rs):.3f}-{max(rs):.3f})")
    if a.no_overhead:
        return 0
    instructions = instructions_per_rank(a)
    tiny_proc = statistics.median(in_processes(duplex_process, a, 4)[1:])
    tiny_thread = statistics.median(duplex_run(a, 4)[0][1:])
    work = module_work(a, 4)
    print(f"executor overhead (width-4 modules, {instructions} instructions per rank): processes "
          f"{1e6 * tiny_proc / instructions:.1f} us per instruction ({1e3 * tiny_proc:.2f} ms per step), in-process "
          f"{1e6 * tiny_thread / instructions:.1f} us ({1e3 * tiny_thread:.2f} ms)")
    print(f"the same module calls by plain PyTorch on one thread: {1e3 * work:.2f} ms per step per rank; beyond "
          f"them (the executor, the transfers and the waits for the other rank): processes "
          f"{1e6 * (tiny_proc - work) / instructions:.1f} us per instruction, in-process "
          f"{1e6 * (tiny_thread - work) / instructions:.1f} us")
    # The executor alone: DualPipeV over 2 stages is one rank holding both, no transfers and nothing to wait for.
    one = argparse.Namespace(**{**vars(a), "stages": 2})
    n_one, costs = instructions_per_rank(one), []
    for _ in range(5):  # alternated, so that a slow spell of the machine touches both sides of the subtraction
        t_one, work_one = statistics.median(duplex_run(one, 4)[0][1:]), module_work(one, 4)
        costs.append((t_one - work_one) / n_one)
        print(f"one rank holding both stages (width 4): step {1e3 * t_one:.2f} ms, the module calls "
              f"{1e3 * work_one:.2f} ms: the executor's own cost {1e6 * costs[-1]:.1f} us per instruction ({n_one})")
    print(f"the executor's own cost with Python stages: median {1e6 * statistics.median(costs):.1f} us per instruction "
          f"over {len(costs)} runs")

if __name__ == "__main__":
    sys.exit(main())
