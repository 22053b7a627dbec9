"""deepseek-ai/DualPipe's interface on Duplex's executor: DualPipe, DualPipeV, set_p2p_tensor_shapes,
set_p2p_tensor_dtype, WeightGradStore and run_backward with the semantics of that project's README and examples, so
a script written for it runs by changing its imports: under torchrun (or mpirun, srun) after
torch.distributed.init_process_group, a DualPipe takes this process's Duplex world (duplex.torch.process_world); in
a duplex.torch.run rank function (in-process ranks), that function's world; or process_group= a Duplex
communicator.

    pipe = DualPipe((stage_r, stage_pp_minus_1_minus_r))      # this rank's two stages, as theirs
    loss, outputs = pipe.step(x, num_chunks=20, criterion=crit, labels=(l,), return_outputs=False)

What step() does, as theirs: the inputs are given where the chunks enter (DualPipe: the first half of the chunks on
rank 0, the second half on the last rank; DualPipeV: all on rank 0); labels where the loss is computed (DualPipe:
rank 0 holds the labels of the last rank's inputs and the other way round; DualPipeV: rank 0); each chunk's loss
criterion(*outputs, *labels) is backpropagated as it is (not averaged); the two copies of a stage keep their own
gradients (the caller sums them, as their example does); returns (loss, outputs) on the ranks that computed them —
the per-chunk losses stacked, the outputs concatenated along batch_dim — and (None, None) elsewhere; under
torch.no_grad() it runs forward only. overlapped_forward_backward is not needed: Duplex overlaps the two halves of
an F&B pair itself.
"""
import threading

import torch

from ._process_world import group_world

_shapes = None
_dtype = None


def set_p2p_tensor_shapes(shapes):
    """Accepted as theirs; not needed: Duplex sends each chunk's shapes with it (they may change between steps)."""
    global _shapes
    _shapes = [tuple(s) for s in shapes]


def set_p2p_tensor_dtype(dtype):
    """Accepted as theirs; not needed: the tensors crossing a boundary keep their own dtypes."""
    global _dtype
    _dtype = dtype


class _Store(threading.local):
    def __init__(self):
        self.enabled, self.cache = False, []


class _StoreMeta(type):
    # WeightGradStore.enabled reads this thread's flag: ranks (and the two halves of an F&B pair) are threads.
    @property
    def enabled(cls):
        return cls._state.enabled

    @enabled.setter
    def enabled(cls, value):
        cls._state.enabled = bool(value)


class WeightGradStore(metaclass=_StoreMeta):
    """Deferred weight-gradient work of custom autograd functions, as in deepseek-ai/DualPipe: a function whose
    backward sees WeightGradStore.enabled puts its weight-gradient closure here instead of running it. Duplex
    enables it while it computes a stage's input gradient (B) and runs the closures at the stage's W; the state is
    per thread."""
    _state = _Store()

    @classmethod
    def put(cls, func):
        cls._state.cache.append(func)

    @classmethod
    def take(cls):
        funcs, cls._state.cache = cls._state.cache, []
        return funcs

    @classmethod
    def clear(cls):
        cls._state.cache = []


class deferring:
    """with deferring() as funcs: the weight-gradient closures custom functions put while the block runs (this
    thread), in `funcs` after it."""

    def __enter__(self):
        self.before, WeightGradStore.enabled = WeightGradStore.enabled, True
        self.saved = WeightGradStore.take()
        self.funcs = []
        return self.funcs

    def __exit__(self, *exc):
        self.funcs.extend(WeightGradStore.take())
        WeightGradStore._state.cache = self.saved
        WeightGradStore.enabled = self.before
        return False


def run_backward(tensors, grad_tensors):
    """Backward from `tensors` with `grad_tensors`, accumulating into .grad (their utility's contract)."""
    torch.autograd.backward([t for t in tensors if t is not None],
                            [g for t, g in zip(tensors, grad_tensors) if t is not None])


def _chunks(x, n, dim):
    return list(x.tensor_split(n, dim=dim)) if x is not None else [None] * n


def _merge(outputs, dim):
    """Per-chunk outputs (tensors, or tuples of them) concatenated along dim."""
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts, dim) for parts in zip(*outputs))
    return torch.cat(outputs, dim)


class _DualPipeBase(torch.nn.Module):
    schedule = None

    def __init__(self, modules, batch_dim=0, process_group=None, rank_mapping=None):
        super().__init__()
        from . import torch as dt  # noqa: F811 (the package module, not torch)
        self._dt = dt
        self.module = torch.nn.ModuleList(modules)
        if len(self.module) != 2:
            raise ValueError(f"{type(self).__name__} takes this rank's two stage modules, got {len(self.module)}")
        self.batch_dim = batch_dim
        self.world = group_world(process_group, type(self).__name__)
        if rank_mapping is not None and list(rank_mapping) != list(range(self.world.size)):
            raise ValueError("rank_mapping: only the identity mapping is supported")
        self.rank, self.num_ranks = self.world.rank, self.world.size
        self._pipe = None

    def _pipeline(self, num_chunks, criterion):
        if self._pipe is None or self._pipe.microbatches != num_chunks:
            if self._pipe is not None:
                self._pipe.close()
            pp = self.num_ranks * (2 if self.schedule == "dualpipev" else 1)
            modules = list(self.module)
            self._pipe = self._dt.Pipeline(self.world, modules, schedule=self.schedule, pp=pp, microbatches=num_chunks,
                                           loss_fn=self._loss, _sum_pairs=False, _loss_scale=1.0)
        self._criterion = criterion
        return self._pipe

    def _loss(self, out, labels):
        return self._criterion(*(out if isinstance(out, tuple) else (out,)), *labels)

    def _places(self, n):
        """(chunks whose inputs are given here, chunks whose labels are given here), as microbatch ids."""
        raise NotImplementedError

    def step(self, *inputs, num_chunks=0, criterion=None, labels=(), return_outputs=False):
        forward_only = not torch.is_grad_enabled()
        if num_chunks <= 0 or num_chunks % 2:
            raise ValueError(f"num_chunks must be positive and even, got {num_chunks}")
        pipe = self._pipeline(num_chunks, criterion)
        fed, judged = self._places(num_chunks)
        if (fed or judged) and criterion is None and not forward_only:
            raise ValueError("criterion is required on the ranks that compute the loss")
        xs = [_chunks(x, len(fed), self.batch_dim) for x in inputs] if fed else []
        ls = [_chunks(lab, len(judged), self.batch_dim) for lab in labels] if judged else []
        one = len(inputs) == 1  # a single input goes to the module as a tensor (a tuple would too, unpacked)
        losses, outs = pipe._run_chunks({mb: xs[0][i] if one else tuple(c[i] for c in xs) for i, mb in enumerate(fed)},
                                        {mb: tuple(c[i] for c in ls) for i, mb in enumerate(judged)},
                                        return_outputs, forward_only)
        mine = sorted(losses)
        if not mine:
            return None, None
        loss = torch.stack([losses[mb] for mb in mine])
        outputs = _merge([outs[mb] for mb in mine], self.batch_dim) if return_outputs else None
        return loss, outputs

    def close(self):
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None


class DualPipe(_DualPipeBase):
    """DualPipe over num_ranks ranks (even), rank r holding stages r and num_ranks-1-r."""
    schedule = "dualpipe"

    def _places(self, n):
        half = list(range(n // 2)), list(range(n // 2, n))
        if self.rank == 0:
            return half[0], half[1]  # feeds the down direction, computes the up direction's loss
        if self.rank == self.num_ranks - 1:
            return half[1], half[0]
        return [], []


class DualPipeV(_DualPipeBase):
    """DualPipeV over num_ranks ranks: 2 x num_ranks stages, rank r holding stages r and 2 num_ranks-1-r; the
    inputs, the labels and the loss on rank 0."""
    schedule = "dualpipev"

    def _places(self, n):
        return (list(range(n)), list(range(n))) if self.rank == 0 else ([], [])
