"""duplex.torch.DualPipe and DualPipeV against deepseek-ai/DualPipe's own example checks, written from the
description of its examples: their MLP stage (a Linear whose weight gradient goes through WeightGradStore), their
reference step (the whole model, chunk by chunk, each chunk's loss backpropagated as it is), their checks — the
per-chunk losses equal the reference's bit for bit on the ranks that compute them and None elsewhere, every
gradient within cal_diff < 1e-13 after the caller sums DualPipe's two copies, and a forward-only step under
torch.no_grad() returning the same losses and the outputs. What differs from such a script: the imports, fp64 on
the CPU instead of CUDA, ranks as threads of duplex.torch.run (so the model is built under a lock: torch's RNG is
shared by the threads) and the all-gather of the gradient check on the Duplex communicator instead of
torch.distributed."""
import threading
import unittest

import torch
import torch.nn as nn
import torch.nn.functional as F

import duplex.torch as dt
from duplex.torch import DualPipe, DualPipeV, WeightGradStore, set_p2p_tensor_dtype, set_p2p_tensor_shapes

_build = threading.Lock()


class LinearFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight):
        ctx.save_for_backward(input, weight)
        return F.linear(input, weight)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)

        def grad_weight_fn():
            weight.grad += grad_output.flatten(0, -2).T @ input.flatten(0, -2)

        if WeightGradStore.enabled:
            WeightGradStore.put(grad_weight_fn)
        else:
            grad_weight_fn()
        return grad_output @ weight, None


class MyLinear(nn.Linear):
    def forward(self, input):
        return LinearFunc.apply(input, self.weight)


class PipelineStage(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.linear1 = MyLinear(hidden_size, hidden_size * 4, bias=False)
        self.linear2 = MyLinear(hidden_size * 4, hidden_size, bias=False)

    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x)))


def criterion(output, target):
    return F.mse_loss(output, target).clone()


def ref_step(x, l, model, chunks):
    ys, losses = [], []
    for micro_x, micro_l in zip(x.chunk(chunks), l.chunk(chunks)):
        micro_y = model(micro_x)
        loss = criterion(micro_y, micro_l)
        loss.backward()
        ys.append(micro_y)
        losses.append(loss)
    return torch.stack(losses), torch.cat(ys, 0)


def cal_diff(x, y):
    x, y = x.double(), y.double()
    return 1 - 2 * (x * y).sum().item() / (x * x + y * y).sum().item()


NUM_CHUNKS, MICRO_BATCH, SEQ, HIDDEN = 20, 3, 16, 32


def main_dualpipe(world, failures):
    rank, pp_size = world.rank, world.size
    is_first_rank, is_last_rank = rank == 0, rank == pp_size - 1
    set_p2p_tensor_shapes([(MICRO_BATCH, SEQ, HIDDEN)])
    set_p2p_tensor_dtype(torch.float64)
    with _build:
        torch.manual_seed(233)
        full_modules = nn.Sequential(*[PipelineStage(HIDDEN) for _ in range(pp_size)]).double()
        full_x = torch.randn(NUM_CHUNKS * MICRO_BATCH, SEQ, HIDDEN, dtype=torch.float64)
        full_l = torch.randn(NUM_CHUNKS * MICRO_BATCH, SEQ, HIDDEN, dtype=torch.float64)
        loss_ref, output_ref = ref_step(full_x, full_l, full_modules, NUM_CHUNKS)
        local_full_modules = nn.Sequential(full_modules[rank], full_modules[pp_size - 1 - rank])
        local_modules = nn.Sequential(PipelineStage(HIDDEN), PipelineStage(HIDDEN)).double()
        local_modules[0].load_state_dict(local_full_modules[0].state_dict())
        local_modules[1].load_state_dict(local_full_modules[1].state_dict())
    dualpipe_model = DualPipe(local_modules)

    if is_first_rank:
        x, l = full_x.chunk(2)[0], full_l.chunk(2)[1]
    elif is_last_rank:
        x, l = full_x.chunk(2)[1], full_l.chunk(2)[0]
    else:
        x = l = None

    loss, outputs = dualpipe_model.step(x, num_chunks=NUM_CHUNKS, criterion=criterion, labels=(l,),
                                        return_outputs=False)
    if is_first_rank:
        check(failures, torch.equal(loss, loss_ref.chunk(2)[1]), rank, "loss")
    elif is_last_rank:
        check(failures, torch.equal(loss, loss_ref.chunk(2)[0]), rank, "loss")
    else:
        check(failures, loss is None, rank, "loss on a middle rank")
    check(failures, outputs is None, rank, "outputs")

    for p0, p1 in zip(local_modules[0].parameters(), local_modules[1].parameters()):
        p0all = torch.empty(pp_size, *p0.shape, dtype=p0.dtype)
        p1all = torch.empty(pp_size, *p1.shape, dtype=p1.dtype)
        world.all_gather(p0.grad.contiguous(), p0all)
        world.all_gather(p1.grad.contiguous(), p1all)
        p0.grad += p1all[pp_size - 1 - rank]
        p1.grad += p0all[pp_size - 1 - rank]
    for (n, p), p_ref in zip(local_modules.named_parameters(), local_full_modules.parameters()):
        check(failures, cal_diff(p.grad, p_ref.grad) < 1e-13, rank, f"gradient of {n}: {cal_diff(p.grad, p_ref.grad)}")
    dualpipe_model.zero_grad()

    with torch.no_grad():
        loss, outputs = dualpipe_model.step(x, num_chunks=NUM_CHUNKS, criterion=criterion, labels=(l,),
                                            return_outputs=True)
    if is_first_rank:
        check(failures, torch.equal(loss, loss_ref.chunk(2)[1]), rank, "inference loss")
        check(failures, torch.equal(outputs, output_ref.chunk(2)[1]), rank, "inference outputs")
    elif is_last_rank:
        check(failures, torch.equal(loss, loss_ref.chunk(2)[0]), rank, "inference loss")
        check(failures, torch.equal(outputs, output_ref.chunk(2)[0]), rank, "inference outputs")
    else:
        check(failures, loss is None and outputs is None, rank, "inference on a middle rank")
    dualpipe_model.close()


def main_dualpipev(world, failures):
    rank, pp_size = world.rank, world.size
    is_first_rank = rank == 0
    set_p2p_tensor_shapes([(MICRO_BATCH, SEQ, HIDDEN)])
    set_p2p_tensor_dtype(torch.float64)
    with _build:
        torch.manual_seed(233)
        full_modules = nn.Sequential(*[PipelineStage(HIDDEN) for _ in range(pp_size * 2)]).double()
        x = torch.randn(NUM_CHUNKS * MICRO_BATCH, SEQ, HIDDEN, dtype=torch.float64)
        l = torch.randn(NUM_CHUNKS * MICRO_BATCH, SEQ, HIDDEN, dtype=torch.float64)
        loss_ref, output_ref = ref_step(x, l, full_modules, NUM_CHUNKS)
        local_full_modules = nn.Sequential(full_modules[rank], full_modules[pp_size * 2 - 1 - rank])
        local_modules = nn.Sequential(PipelineStage(HIDDEN), PipelineStage(HIDDEN)).double()
        local_modules[0].load_state_dict(local_full_modules[0].state_dict())
        local_modules[1].load_state_dict(local_full_modules[1].state_dict())
    dualpipev_model = DualPipeV(local_modules)
    if not is_first_rank:
        x = l = None

    loss, outputs = dualpipev_model.step(x, num_chunks=NUM_CHUNKS, criterion=criterion, labels=(l,),
                                         return_outputs=False)
    if is_first_rank:
        check(failures, torch.equal(loss, loss_ref), rank, "loss")
    else:
        check(failures, loss is None, rank, "loss on another rank")
    check(failures, outputs is None, rank, "outputs")
    for (n, p), p_ref in zip(local_modules.named_parameters(), local_full_modules.parameters()):
        check(failures, cal_diff(p.grad, p_ref.grad) < 1e-13, rank, f"gradient of {n}: {cal_diff(p.grad, p_ref.grad)}")
    dualpipev_model.zero_grad()

    with torch.no_grad():
        loss, outputs = dualpipev_model.step(x, num_chunks=NUM_CHUNKS, criterion=criterion, labels=(l,),
                                             return_outputs=True)
    if is_first_rank:
        check(failures, torch.equal(loss, loss_ref), rank, "inference loss")
        check(failures, torch.equal(outputs, output_ref), rank, "inference outputs")
    else:
        check(failures, loss is None and outputs is None, rank, "inference on another rank")
    dualpipev_model.close()


def dualpipev_pair(rank, seed, dtype):
    """A 4-stage model and this rank's DualPipeV pair of copies of its stages (rank and 3 - rank), on 2 ranks."""
    with _build:
        torch.manual_seed(seed)
        full = nn.Sequential(*[PipelineStage(HIDDEN) for _ in range(4)]).to(dtype)
        local = nn.Sequential(PipelineStage(HIDDEN), PipelineStage(HIDDEN)).to(dtype)
        local[0].load_state_dict(full[rank].state_dict())
        local[1].load_state_dict(full[3 - rank].state_dict())
    return full, local


def check(failures, ok, rank, what):
    if not ok:
        failures.append(f"rank {rank}: {what}")


class DualPipeExamples(unittest.TestCase):
    def run_example(self, main, ranks):
        failures = []
        dt.run(lambda world: main(world, failures), ranks=ranks, timeout_s=120)
        self.assertEqual(failures, [])

    def test_dualpipe_on_2_and_4_ranks(self):
        for ranks in (2, 4):
            with self.subTest(ranks=ranks):
                self.run_example(main_dualpipe, ranks)

    def test_dualpipev_on_2_and_4_ranks(self):
        for ranks in (2, 4):
            with self.subTest(ranks=ranks):
                self.run_example(main_dualpipev, ranks)

    def test_bf16_weight_gradients_of_custom_functions_reach_the_masters(self):
        # Their LinearFunc writes weight.grad itself (through WeightGradStore at W, or at once): in BF16 Duplex sums in
        # fp32 masters, which must take those gradients too. Against the reference step in BF16 (autograd adding
        # into .grad in BF16): a dropped weight gradient is cal_diff 1; BF16 rounding of the sums is ~1e-4.
        failures = []

        def main(world):
            full, local = dualpipev_pair(world.rank, 9, torch.bfloat16)
            g = torch.Generator().manual_seed(9)  # the same batch on both ranks
            x = torch.randn(8 * MICRO_BATCH, SEQ, HIDDEN, generator=g).to(torch.bfloat16)
            lab = torch.randn(8 * MICRO_BATCH, SEQ, HIDDEN, generator=g).to(torch.bfloat16)
            ref_step(x, lab, full, 8)
            model = DualPipeV(local)
            model.step(x if world.rank == 0 else None, num_chunks=8, criterion=criterion,
                       labels=(lab if world.rank == 0 else None,))
            for (n, p), p_ref in zip(local.named_parameters(), nn.Sequential(full[world.rank],
                                                                               full[3 - world.rank]).parameters()):
                ok = p.grad is not None and cal_diff(p.grad, p_ref.grad) < 1e-3
                check(failures, ok, world.rank, f"bf16 gradient of {n}: "
                      f"{None if p.grad is None else cal_diff(p.grad, p_ref.grad)}")
            model.close()

        dt.run(main, ranks=2, timeout_s=60)
        self.assertEqual(failures, [])

    def test_no_process_group_is_an_error_naming_the_class(self):
        # Outside a launcher, without torch.distributed and outside duplex.torch.run: nothing to take ranks from.
        with self.assertRaisesRegex(ValueError, "DualPipeV: no process group .*torch.distributed.init_process_group"):
            DualPipeV((nn.Linear(2, 2), nn.Linear(2, 2)))

    def test_shapes_follow_each_step_without_being_set(self):
        # No set_p2p_tensor_shapes: each chunk's shape travels with it, so the sequence length may change per step.
        import duplex._dualpipe as d
        saved, d._shapes = d._shapes, None
        failures = []

        def main(world):
            full, local = dualpipev_pair(world.rank, 5, torch.float64)
            model = DualPipeV(local)
            for seq in (16, 9, 23):
                g = torch.Generator().manual_seed(seq)
                x = torch.randn(8 * MICRO_BATCH, seq, HIDDEN, dtype=torch.float64, generator=g)
                lab = torch.randn(8 * MICRO_BATCH, seq, HIDDEN, dtype=torch.float64, generator=g)
                want, _ = ref_step(x, lab, full, 8)
                loss, _ = model.step(x if world.rank == 0 else None, num_chunks=8, criterion=criterion,
                                     labels=(lab if world.rank == 0 else None,))
                if world.rank == 0:
                    check(failures, torch.equal(loss, want), 0, f"loss at sequence length {seq}")
                for p, p_ref in zip(local[0].parameters(), full[world.rank].parameters()):
                    check(failures, cal_diff(p.grad, p_ref.grad) < 1e-13, world.rank, f"gradient at length {seq}")
                model.zero_grad()
                full.zero_grad()
            model.close()

        try:
            dt.run(main, ranks=2, timeout_s=60)
        finally:
            d._shapes = saved
        self.assertEqual(failures, [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
