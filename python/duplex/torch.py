"""duplex.torch: Duplex as the pipeline backend of a PyTorch model.

A rank hands its stage modules to a Pipeline; Duplex's executor runs the schedule (1F1B, ZB1P, DualPipe,
DualPipeV) over them: activations and gradients move between ranks through Duplex's communicator, every
backward is split with autograd into the input gradient (B, on the critical path) and the weight gradient (W,
deferred to where the schedule puts it), DualPipe's two copies of a stage sum their gradients and data-parallel
replicas all-reduce theirs. The gradients are left in the modules' .grad, so any torch optimizer steps them.

    def rank_main(world):                       # duplex.launch(rank_main, ranks=4): PP=2 x DP=2
        stage = make_stage(world.rank // 2)      # this rank's nn.Module
        pipe = duplex.torch.Pipeline(world, [stage], schedule="1f1b", pp=2, dp=2, microbatches=4,
                                     loss_fn=torch.nn.functional.mse_loss, activation_shape=(8, 32))
        opt = torch.optim.SGD(stage.parameters(), lr=0.1)
        for x, y in batches:
            loss = pipe.step(x, y)               # the global batch; every rank passes the same one
            opt.step(); opt.zero_grad()

Modules: one per stage the schedule places on this rank — one for 1f1b and zb1p (stage r), two for dualpipe and
dualpipev, in DualPipe's order (stage r, then stage PP-1-r). `activation_shape` is the shape of one microbatch's
activation between stages (the same at every boundary); a stage that returns another shape is an error naming
the stage and the microbatch.
"""
import threading
import weakref

import torch

from . import _duplex

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_ELEMENT = {torch.float32: "float", torch.float64: "double"}  # Duplex's dtype names


# ---- expert parallelism: dispatch and combine as autograd functions over the stage's EP group ----

_current = threading.local()  # the stage info of the stage call running on this thread


def ep_group():
    """The expert-parallel group of the stage being run on this thread (None outside a Pipeline or without EP)."""
    info = getattr(_current, "info", None)
    return None if info is None else info.ep_group


class Routed:
    """What dispatch() returns beside the rows: how to send results back (combine) and how many rows each peer
    sent (rows are grouped by source rank, in rank order)."""

    def __init__(self, order, send_rows, recv_rows, info):
        self.order, self.send_rows, self.recv_rows, self.info = order, send_rows, recv_rows, info


def _exchange(group, rows, send_rows, recv_rows, what):
    rows = rows.contiguous()
    out = rows.new_empty((sum(recv_rows),) + tuple(rows.shape[1:]))
    group.all_to_all_v(rows.detach(), send_rows, out, recv_rows, what)
    return out


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, routed):
        ctx.routed = routed
        return _exchange(routed.info.ep_group, x[routed.order], routed.send_rows, routed.recv_rows, "dispatch")

    @staticmethod
    def backward(ctx, g):
        r = ctx.routed
        back = _exchange(r.info.ep_group_backward, g, r.recv_rows, r.send_rows, "dispatch-bwd")
        gx = torch.empty_like(back)
        gx[r.order] = back
        return gx, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, routed):
        ctx.routed = routed
        back = _exchange(routed.info.ep_group, rows, routed.recv_rows, routed.send_rows, "combine")
        out = torch.empty_like(back)
        out[routed.order] = back
        return out

    @staticmethod
    def backward(ctx, g):
        r = ctx.routed
        return _exchange(r.info.ep_group_backward, g[r.order], r.send_rows, r.recv_rows, "combine-bwd"), None


def mark_experts(module):
    """Marks a module's parameters as routed-expert weights: each rank of an EP group holds its own, so their
    gradients are summed over the expert-data-parallel group (DP / EP replicas), not over DP."""
    for p in module.parameters():
        p._duplex_expert = True
    return module


def dispatch(x, dest):
    """Sends row i of x [N, ...] to rank dest[i] of the stage's expert-parallel group; returns the rows this rank
    received (grouped by source rank, in rank order, each source's rows in their original order) and a Routed handle
    for combine(). Differentiable; inside a Pipeline stage its waits go through Duplex's executor."""
    info = getattr(_current, "info", None)
    if info is None or info.ep_group is None:
        raise RuntimeError("duplex.torch.dispatch runs inside a Pipeline stage with ep > 1")
    group = info.ep_group
    dest = dest.to(torch.int64)
    order = torch.argsort(dest, stable=True)
    send_rows = torch.bincount(dest, minlength=group.size).tolist()
    counts = torch.tensor(send_rows, dtype=torch.int64)
    recv = torch.empty_like(counts)
    group.all_to_all(counts, recv)
    routed = Routed(order, send_rows, recv.tolist(), info)
    return _Dispatch.apply(x, routed), routed


def combine(rows, routed):
    """Sends the rows dispatch() delivered here (or results computed from them, same count) back to where they came
    from: returns [N, ...] in the order of dispatch's x. Differentiable."""
    return _Combine.apply(rows, routed)


class _TorchStage:
    """One stage module behind the Stage contract (called from Duplex's executor threads, under the GIL)."""

    def __init__(self, pipe, module, info):
        # A weak reference: the executor (C++) holds this stage, the Pipeline holds the executor.
        self.pipe, self.module, self.info = weakref.proxy(pipe), module, info
        self.first = info.stage == 0
        self.last = info.stage == info.num_stages - 1
        self.saved = {}  # mb -> (input that needs a gradient or None, output or scaled loss, output gradient)
        self.losses = {}
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.zero_grad()

    def name(self):
        return f"torch stage {self.info.stage} ({type(self.module).__name__})"

    def activation(self, mb):
        return list(self.pipe.activation_shape), _ELEMENT[self.pipe.dtype]

    def forward(self, mb, global_mb, step, x):
        _current.info = self.info
        if self.first:
            inp = self.pipe._inputs[global_mb]
        else:
            inp = x.detach().requires_grad_(True)
        out = self.module(inp)
        if self.last:
            loss = self.pipe.loss_fn(out, self.pipe._labels[global_mb])
            if loss.dim() != 0:
                raise ValueError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}, not a scalar")
            self.losses[mb] = float(loss.detach())
            self.saved[mb] = [None if self.first else inp, loss * self.info.loss_scale, None]
            return None
        self.saved[mb] = [None if self.first else inp, out, None]
        return out.detach().contiguous()

    def loss(self, mb):
        return self.losses.pop(mb)

    def backward_input(self, mb, dy, weight_follows):
        _current.info = self.info
        inp, out, _ = self.saved[mb]
        grad_out = None if self.last else dy
        if weight_follows:  # B and W in one pass over the graph
            targets = ([inp] if inp is not None else []) + self.params
            grads = torch.autograd.grad(out, targets, grad_out, allow_unused=True)
            dx = None
            if inp is not None:
                dx, grads = grads[0], grads[1:]
            self._accumulate(grads)
            self.saved[mb] = (None, None, "done")
            return None if dx is None else dx.contiguous()
        self.saved[mb] = (inp, out, grad_out)
        if inp is None:  # the first stage has no input gradient: all of its backward is W
            return None
        (dx,) = torch.autograd.grad(out, [inp], grad_out, retain_graph=True)
        return dx.contiguous()

    def backward_weight(self, mb):
        _current.info = self.info
        inp, out, grad_out = self.saved.pop(mb)
        if isinstance(grad_out, str):  # done together with B
            return
        self._accumulate(torch.autograd.grad(out, self.params, grad_out, allow_unused=True))

    def _accumulate(self, grads):
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.grad.add_(g)

    def state(self):
        out = []
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                expert = bool(getattr(p, "_duplex_expert", False))
                out.append((f"stage{self.info.stage}.{name}", p.data, p.grad, expert, p.dim() > 1))
        return out

    def zero_grad(self):
        # Called before every step: gradients start at zero (and exist: an optimizer's zero_grad sets them to None).
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()


class ZeroAdamW:
    """Duplex's ZeRO-1 AdamW as a Pipeline's optimizer: each data-parallel replica keeps the fp32/fp64 moments of
    only its 1/DP shard; gradients are reduce-scattered, the shard updated, the weights all-gathered — in place in
    the modules' parameters, at the end of every Pipeline.step. Betas (0.9, 0.95), eps 1e-8 (DeepSeek-V3's),
    decoupled weight decay on parameters of two or more dimensions, gradients clipped to a global norm of `clip`
    (0: off)."""

    def __init__(self, lr=1e-3, weight_decay=0.1, clip=1.0):
        self.lr, self.weight_decay, self.clip = lr, weight_decay, clip


class Pipeline:
    """This rank's share of a pipeline-parallel (and data-parallel) model, run by Duplex's executor.

    optimizer: None (gradients left in .grad for a torch optimizer) or ZeroAdamW(...) (Duplex updates the
    parameters). ema_decay > 0 keeps an EMA of the weights in host memory, updated in the background (ema())."""

    def __init__(self, world, modules, schedule="1f1b", pp=None, dp=1, microbatches=4, loss_fn=None,
                 activation_shape=None, dtype=None, optimizer=None, ema_decay=0.0, ep=1):
        if loss_fn is None:
            raise ValueError("Pipeline needs a loss_fn(output, labels) -> scalar tensor")
        if activation_shape is None:
            raise ValueError("Pipeline needs activation_shape: one microbatch's activation between stages")
        self.modules = list(modules)
        self.schedule, self.dp, self.microbatches = schedule, dp, microbatches
        ranks_per_replica = world.size // dp
        folded = schedule in ("dualpipev",)
        self.pp = pp if pp is not None else (2 * ranks_per_replica if folded else ranks_per_replica)
        want = 2 if schedule in ("dualpipe", "dualpipev") else 1
        if len(self.modules) != want:
            raise ValueError(f"{schedule} places {want} stage(s) on each rank; got {len(self.modules)} modules")
        self.loss_fn = loss_fn
        self.activation_shape = tuple(activation_shape)
        params = [p for m in self.modules for p in m.parameters()]
        self.dtype = dtype or (params[0].dtype if params else torch.float32)
        if self.dtype not in _DTYPES:
            raise ValueError(f"parameters of {self.dtype}: the trainer runs float32 or float64")
        self.pipe_rank = world.rank // dp
        self._inputs = self._labels = None
        if optimizer is None:
            kind, lr, wd, clip = "none", 1e-3, 0.0, 0.0
        elif isinstance(optimizer, ZeroAdamW):
            kind, lr, wd, clip = "zero1-adamw", optimizer.lr, optimizer.weight_decay, optimizer.clip
        else:
            raise ValueError("optimizer: None (use a torch optimizer on .grad) or duplex.torch.ZeroAdamW(...)")
        self._trainer = _duplex._Trainer(world, schedule, self.pp, dp, ep, microbatches, self._make_stage,
                                         _DTYPES[self.dtype], kind, lr, wd, clip, ema_decay)

    def _make_stage(self, info):
        own = info.stage == self.pipe_rank
        return _TorchStage(self, self.modules[0 if own else 1], info)

    def step(self, inputs, labels):
        """Runs one step on the global batch (split into DP x microbatches pieces along dim 0); returns the mean
        loss over the global batch's microbatches. Gradients are left in the modules' .grad."""
        n = self.dp * self.microbatches
        if inputs.shape[0] % n or labels.shape[0] % n:
            raise ValueError(f"a batch of {inputs.shape[0]} does not split into {n} microbatches")
        self._inputs = list(torch.chunk(inputs, n))
        self._labels = list(torch.chunk(labels, n))
        metrics = self._trainer.step()
        self.last_metrics = metrics
        return metrics["loss"]

    def ema(self):
        """The EMA of the parameters whose owner copy lives on this rank: {"stage<s>.<name>": numpy array}."""
        return self._trainer.ema()

    def close(self):
        self._trainer.close()


def run(fn, ranks, **kwargs):
    """Runs fn(world) on `ranks` in-process ranks (threads of this process), as duplex.launch."""
    return _duplex.launch(fn, ranks=ranks, **kwargs)
