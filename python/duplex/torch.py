"""duplex.torch: Duplex as the pipeline backend of a PyTorch model.

A rank hands its stage modules to a Pipeline; Duplex's executor runs the schedule (1F1B, ZB1P, DualPipe, DualPipeV,
interleaved 1F1B) over them: activations and gradients move between ranks through Duplex's communicator, every
backward is split with autograd into the input gradient (B, on the critical path) and the weight gradient (W,
deferred to where the schedule puts it), DualPipe's two copies of a stage sum their gradients and data-parallel
replicas all-reduce theirs. The gradients are left in the modules' .grad, so any torch optimizer steps them.

    def rank_main(world):                       # duplex.launch(rank_main, ranks=4): PP=2 x DP=2
        stage = make_stage(world.rank // 2)      # this rank's nn.Module
        pipe = duplex.torch.Pipeline(world, [stage], schedule="1f1b", pp=2, dp=2, microbatches=4,
                                     loss_fn=torch.nn.functional.mse_loss)
        opt = torch.optim.SGD(stage.parameters(), lr=0.1)
        for x, y in batches:
            loss = pipe.step(x, y)               # the global batch; every rank passes the same one
            opt.step(); opt.zero_grad()

Modules: a function from a stage index to its module (called for the stages the schedule places on this rank,
duplex.stages_of_rank), or a list of them in that order — one for 1f1b and zb1p (stage r), two for dualpipe and
dualpipev (stage r, then stage PP-1-r), vpp for interleaved (stages r, r + PP/vpp, ...). Between stages: a tensor,
or a tuple or dict of tensors of any dtype and shape (see Pipeline). BF16/FP16 modules train on fp32 master weights.
"""
import math
import warnings
import weakref

import torch

from . import _boundary
from . import _duplex
from . import _dualpipe
from ._backward import SplitBackward
from ._duplex import DivergenceError  # noqa: F401  (raised by step() and fit() on a run that diverges)
from ._experts import Routed, combine, dispatch, ep_group, mark_experts  # noqa: F401
from ._experts import _current, _current_world  # noqa: F401  (the stage call and world on this thread)
from ._process_world import process_world  # noqa: F401  (this process's world under torchrun, mpirun, srun)

# The trainer's dtype by the parameters': BF16 and FP16 modules train on fp32 masters (_Masters).
_TRAINER_DTYPE = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "float32",
                  torch.float16: "float32"}
# Buffers Duplex checkpoints with the parameters (its tensors' element types).
_STATE_DTYPES = {torch.float32, torch.float64, torch.bfloat16, torch.int32, torch.int64, torch.uint8}


class _TorchStage:
    """One stage module behind the Stage contract (called from Duplex's executor threads, under the GIL). What
    crosses a boundary is packed (duplex._boundary): a tensor, a tuple or a dict of tensors of any shape and dtype,
    announced with each microbatch."""

    def __init__(self, pipe, module, info):
        # A weak reference: the executor (C++) holds this stage, the Pipeline holds the executor.
        self.pipe, self.module, self.info = weakref.proxy(pipe), module, info
        self.first = info.stage == 0
        self.last = info.stage == info.num_stages - 1
        # mb -> after F: (inputs that need a gradient, outputs (or [scaled loss]) that carry one); after B, what
        # W has left to do: ("done",), ("split", SplitBackward) or ("again", outputs, their gradients)
        self.saved = {}
        self.deferred = {}  # mb -> weight-gradient closures custom functions deferred during B
        self.losses = {}
        self.masters = _Masters(module) if pipe._mixed else None
        self._split = None  # whether B keeps the branch points' gradients for W (_split_plan)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.zero_grad()

    def name(self):
        return f"torch stage {self.info.stage} ({type(self.module).__name__})"

    def _enter(self, call):
        """On an executor thread: the stage call its group operations wait through, and torch's intra-op threads as
        the Pipeline's creator set them (OpenMP's setting is per thread: a new thread would take every core, and
        its idle workers spin beside the other ranks)."""
        _current.call = call
        if getattr(_current, "threads", None) != self.pipe._threads:
            torch.set_num_threads(self.pipe._threads)
            _current.threads = self.pipe._threads

    def activation(self, mb):
        return [-1], "uint8"  # packed bytes, their length announced with the microbatch

    def _call(self, value):
        if isinstance(value, tuple):
            return self.module(*value)
        if isinstance(value, dict):
            return self.module(**value)
        return self.module(value)

    def _received(self, x):
        """The previous stage's packed output as this stage's input: leaves that can carry a gradient become leaves
        of this stage's graph."""
        leaves, structure = _boundary.unpack(x)
        leaves = [t if t is None or not t.is_floating_point() else t.detach().requires_grad_(True) for t in leaves]
        return leaves, structure

    def _send(self, mb, out):
        leaves, structure = _boundary.flatten(out)
        shape = self.pipe.activation_shape
        if shape is not None and (structure[0] != 0 or tuple(leaves[0].shape) != shape):
            raise ValueError(f"forward returned {_boundary.describe(leaves)}, expected {list(shape)} "
                             f"(activation_shape)")
        return leaves, _boundary.pack(leaves, structure)

    def _loss(self, mb, global_mb, out):
        loss = self.pipe.loss_fn(out, self.pipe._labels[global_mb])
        if loss.dim() != 0:
            raise ValueError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}, not a scalar")
        self.losses[mb] = float(loss.detach())
        if self.pipe._chunk_losses is not None:  # DualPipe's step returns them (and the outputs)
            self.pipe._chunk_losses[global_mb] = loss.detach()
            if self.pipe._keep_outputs:
                self.pipe._chunk_outputs[global_mb] = _detached(out)
        return loss

    def forward(self, mb, global_mb, step, x, call):
        self._enter(call)
        if call is not None and call.forward_only:  # evaluation: nothing kept for a backward
            with torch.no_grad():
                inp = self.pipe._inputs[global_mb] if self.first else _boundary.rebuild(*_boundary.unpack(x))
                out = self._call(inp)
                if not self.last:
                    return self._send(mb, out)[1]
                self._loss(mb, global_mb, out)
                return None
        if self.first:
            inp, grads_of = self.pipe._inputs[global_mb], []
        else:
            leaves, structure = self._received(x)
            inp, grads_of = _boundary.rebuild(leaves, structure), leaves
        out = self._call(inp)
        if self.last:
            loss = self._loss(mb, global_mb, out)
            self.saved[mb] = (grads_of, [loss * (self.info.loss_scale * self.pipe.grad_scale)])
            return None
        leaves, packed = self._send(mb, out)
        self.saved[mb] = (grads_of, leaves)
        return packed

    def loss(self, mb):
        return self.losses.pop(mb)

    def _graph(self, mb, dy):
        """(outputs, their gradients, inputs that need one) of microbatch mb's backward."""
        inputs, outs = self.saved[mb]
        if self.last:
            return outs, None, inputs
        grads, _ = _boundary.unpack(dy)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o is not None and o.requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs], inputs

    def _input_grads(self, inputs, got):
        """The packed gradient of this stage's inputs (None where an input takes none)."""
        it = iter(got)
        grads = [next(it) if t is not None and t.requires_grad else None for t in inputs]
        grads = [torch.zeros_like(t) if g is None and t is not None and t.requires_grad else g
                 for t, g in zip(inputs, grads)]
        return _boundary.pack(grads, (1, None))

    def backward_input(self, mb, dy, weight_follows, call):
        self._enter(call)
        outs, grad_outs, inputs = self._graph(mb, dy)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        if weight_follows or not wanted:  # B and W in one pass over the graph (or no input gradient: all of it is W)
            if not weight_follows:
                self.saved[mb] = ("again", outs, grad_outs)
                return None if self.first else self._input_grads(inputs, [])
            grads = torch.autograd.grad(outs, wanted + self.params, grad_outs, allow_unused=True)
            self._accumulate(grads[len(wanted):])
            self._fold()
            self.saved[mb] = ("done",)
            return None if self.first else self._input_grads(inputs, grads[:len(wanted)])
        # W will start where the graph branches off to the parameters (SplitBackward) when that pays, or from the
        # outputs again (also where a parameter sits under two such branches).
        split = self._split_plan(outs, wanted)
        self.saved[mb] = ("again", outs, grad_outs) if split is None else ("split", split)
        # Custom autograd functions that defer their weight gradients (WeightGradStore) put them here; W runs them.
        with _dualpipe.deferring() as deferred:
            if split is None:
                got = torch.autograd.grad(outs, wanted, grad_outs, retain_graph=True, allow_unused=True)
            else:
                got = split.backward_input(grad_outs)
        self.deferred[mb] = deferred
        return self._input_grads(inputs, got)

    def _split_plan(self, outs, wanted):
        """The SplitBackward of this B, or None for a second pass. W from the branch points saves recomputing the
        input-side gradients (a matmul per weight below the top one) and costs a graph walk and an autograd call per
        branch point, about 50 us each: taken when the first B finds 16384 weight elements (a 128 x 128 matrix) or
        more per branch point."""
        if self._split is False:
            return None
        plan = SplitBackward.plan(outs, wanted, self.params)
        if self._split is None:
            self._split = plan is not None and sum(p.numel() for p in self.params) / len(plan.starts) >= 16384
        return plan if self._split else None

    def backward_weight(self, mb, call):
        self._enter(call)
        due = self.saved.pop(mb)
        if due[0] == "done":  # done together with B
            return
        deferred = self.deferred.pop(mb, None)
        if deferred is None:  # no B pass ran: custom functions accumulate as autograd reaches them
            self._accumulate(torch.autograd.grad(due[1], self.params, due[2], allow_unused=True))
            self._fold()
            return
        with _dualpipe.deferring():  # this second pass puts the same closures again: dropped
            if due[0] == "split":
                grads = due[1].backward_weight()
            else:
                grads = torch.autograd.grad(due[1], self.params, due[2], allow_unused=True)
        self._accumulate(grads)
        for f in deferred:
            f()
        self._fold()

    def _fold(self):
        """BF16/FP16: what custom autograd functions wrote into a parameter's .grad themselves (deepseek-ai/DualPipe's
        WeightGradStore closures do) joins the fp32 sums."""
        if self.masters is not None:
            self.masters.fold(self.pipe.grad_scale)

    def _accumulate(self, grads):
        with torch.no_grad():
            if self.masters is not None:  # low precision: summed in fp32 (FP16: unscaled)
                self.masters.accumulate(grads, self.pipe.grad_scale)
                return
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.grad.add_(g)

    def state(self):
        out = []
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        for i, (name, p) in enumerate(named):
            expert = bool(getattr(p, "_duplex_expert", False))
            if self.masters is not None:  # Duplex trains, averages and checkpoints the fp32 masters
                out.append((f"stage{self.info.stage}.{name}", self.masters.values[i], self.masters.grads[i], expert,
                            p.dim() > 1))
            else:
                out.append((f"stage{self.info.stage}.{name}", p.data, p.grad, expert, p.dim() > 1))
        for name, b in self.module.named_buffers():  # checkpointed with the parameters (running statistics, ...)
            if b.is_contiguous() and b.device.type == "cpu" and b.dtype in _STATE_DTYPES:
                out.append((f"stage{self.info.stage}.buffer.{name}", b.data, None, False, False))
        return out

    def zero_grad(self):
        # Called before every step: gradients start at zero (and exist: an optimizer's zero_grad sets them to None).
        if self.masters is not None:
            self.masters.zero_grad()
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()


class _Masters:
    """fp32 master copies of a BF16/FP16 module's trained parameters and fp32 gradient sums: every microbatch's
    gradient is added here in fp32, DualPipe's pair sum, the data-parallel reductions, ZeroAdamW (fp32 moments) and
    the EMA work on them, and the module's parameters are rounded from them after each step."""

    def __init__(self, module):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.values = [p.detach().to(torch.float32).contiguous() for p in self.params]
        self.grads = [torch.zeros_like(v) for v in self.values]

    def accumulate(self, grads, scale=1.0):
        for total, g in zip(self.grads, grads):
            if g is not None:
                _add_unscaled(total, g, scale)  # in fp32

    def zero_grad(self):
        for g in self.grads:
            g.zero_()
        for p in self.params:  # .grad is where custom functions write (fold); the sums live here
            p.grad = None

    def fold(self, scale=1.0):
        with torch.no_grad():
            for total, p in zip(self.grads, self.params):
                if p.grad is not None:
                    _add_unscaled(total, p.grad, scale)
                    p.grad = None

    def to_module(self):
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)

    def from_module(self):
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                v.copy_(p)

    def grads_to_module(self):
        for p, g in zip(self.params, self.grads):
            p.grad = g.to(p.dtype)


def _add_unscaled(total, g, scale):
    if scale == 1.0:
        total.add_(g)
    else:
        total.add_(g, alpha=1.0 / scale)


def _detached(value):
    leaves, structure = _boundary.flatten(value)
    return _boundary.rebuild([None if t is None else t.detach() for t in leaves], structure)


def _split(value, n, what):
    """A tensor, tuple or dict of tensors cut into n microbatches along dim 0."""
    leaves, structure = _boundary.flatten(value)
    for t in leaves:
        if t.dim() == 0 or t.shape[0] % n:
            raise ValueError(f"{what} of {tuple(t.shape)} does not split into {n} microbatches along dim 0")
    chunks = [torch.chunk(t, n) for t in leaves]
    return [_boundary.rebuild([c[i] for c in chunks], structure) for i in range(n)]


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

    schedule: 1f1b, zb1p, dualpipe, dualpipev, interleaved (Megatron's interleaved 1F1B: vpp stages per rank,
    stage s on pipeline rank s % (pp / vpp)) or interleaved-fb (its steady state as F&B pairs, each backward with
    the next forward: with ep > 1 one's expert exchange waits while the other computes). pp counts the model's
    stages (default: the pipeline ranks times the stages each holds).

    Between stages: a tensor, a tuple of tensors or a dict of them (a tuple is passed to the next stage's module as
    positional arguments, a dict as keyword arguments), each of its own dtype — integer and bool tensors too — and
    of any shape, which may change from step to step and microbatch to microbatch (the shapes travel with the
    microbatch). The inputs and labels handed to step() are split into microbatches along dim 0 likewise.
    activation_shape (optional): the one tensor every stage must pass on, checked.

    Precision: parameters of float32 or float64 train as they are. BF16 or FP16 parameters train on fp32 masters:
    each microbatch's gradient is added to an fp32 sum, DualPipe's pair sums and the data-parallel reductions run
    in fp32, ZeroAdamW keeps fp32 masters and moments and rounds the module's parameters from the masters after
    every step; the activations and their gradients stay in the module's dtype. With a torch optimizer (optimizer
    None) the fp32 gradient sums are left, rounded, in .grad. FP16 adds a dynamic loss scale (grad_scale, 2^16 to
    start): the loss is multiplied by it before the backward and each gradient divided by it into the fp32 sums; a
    step whose gradients overflow (its loss finite) is skipped, halves the scale and does not count towards
    max_bad_steps; 2000 applied steps in a row double it (last_metrics["grad_scale"]).

    DualPipe's F&B pairs: with ep > 1 the two halves run on two threads, one computing while the other waits for
    its expert exchange; with ep == 1 there is nothing to wait for inside a call and Python stages cannot compute at
    once under one interpreter lock, so the halves run one after the other.

    optimizer: None (gradients left in .grad for a torch optimizer) or ZeroAdamW(...) (Duplex updates the
    parameters). ema_decay > 0 keeps an EMA of the weights in host memory, updated in the background (ema()).

    A step whose loss or gradient norm is not finite is not applied: ZeroAdamW leaves the parameters and its
    moments, and the EMA, as they were; last_metrics["applied"] is False and a RuntimeWarning says where it
    started (rank, stage, microbatch, the first parameter whose gradient is not finite). With a torch optimizer,
    skip its step when last_metrics["applied"] is False. After max_bad_steps such steps in a row (0: never),
    step() and fit() raise DivergenceError (fit keeps its last checkpoint as it was)."""

    def __init__(self, world, modules, schedule="1f1b", pp=None, dp=1, microbatches=4, loss_fn=None,
                 activation_shape=None, dtype=None, optimizer=None, ema_decay=0.0, ep=1, max_bad_steps=3,
                 vpp=1, _sum_pairs=True, _loss_scale=0.0):
        if loss_fn is None:
            raise ValueError("Pipeline needs a loss_fn(output, labels) -> scalar tensor")
        if int(max_bad_steps) < 0:
            raise ValueError(f"max_bad_steps must be 0 or more, got {max_bad_steps}")
        self.schedule, self.dp, self.microbatches = schedule, dp, microbatches
        ranks_per_replica = world.size // dp
        interleaved = schedule in ("interleaved", "interleaved-fb")
        folded = 2 if schedule == "dualpipev" else int(vpp) if interleaved else 1  # stages per rank
        self.vpp = int(vpp)
        self.pp = pp if pp is not None else folded * ranks_per_replica
        self.pipe_rank = world.rank // dp
        self.stages = _duplex.stages_of_rank(schedule, self.pp, self.pipe_rank, self.vpp)  # this rank's, own first
        self.modules = [modules(s) for s in self.stages] if callable(modules) else list(modules)
        if len(self.modules) != len(self.stages):
            raise ValueError(f"{schedule} places {len(self.stages)} stage(s) on each rank (here {self.stages}); got "
                             f"{len(self.modules)} modules")
        self.loss_fn = loss_fn
        self.max_bad_steps = int(max_bad_steps)
        self.activation_shape = None if activation_shape is None else tuple(activation_shape)
        params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        self.dtype = dtype or (params[0].dtype if params else torch.float32)
        if self.dtype not in _TRAINER_DTYPE:
            raise ValueError(f"parameters of {self.dtype}: duplex.torch trains float32, float64, bfloat16 or float16")
        odd = sorted({str(p.dtype) for p in params if p.dtype != self.dtype})
        if odd:
            raise ValueError(f"the stages' parameters are {self.dtype} and {', '.join(odd)}: one dtype per Pipeline")
        self._mixed = self.dtype in (torch.bfloat16, torch.float16)
        # FP16's dynamic loss scale (_scale_after): the loss is multiplied by it before the backward, each gradient
        # divided by it as it joins the fp32 sums. 1 for every other dtype.
        self._fp16 = self.dtype == torch.float16
        self.grad_scale = 2.0 ** 16 if self._fp16 else 1.0
        self._scale_good = 0    # applied steps since the scale last changed
        self._bad_in_a_row = 0  # steps not applied in a row (FP16's overflows aside): what max_bad_steps counts
        self._threads = torch.get_num_threads()  # the executor's threads run torch with as many
        self._built = []  # this rank's _TorchStage objects
        self._inputs = self._labels = None
        self._chunk_losses = self._chunk_outputs = None  # DualPipe's step: per-chunk losses and outputs kept here
        self._keep_outputs = False
        if optimizer is None:
            kind, lr, wd, clip = "none", 1e-3, 0.0, 0.0
        elif isinstance(optimizer, ZeroAdamW):
            kind, lr, wd, clip = "zero1-adamw", optimizer.lr, optimizer.weight_decay, optimizer.clip
        else:
            raise ValueError("optimizer: None (use a torch optimizer on .grad) or duplex.torch.ZeroAdamW(...)")
        self._optimizer = kind
        self._trainer = _duplex._Trainer(world, schedule, self.pp, dp, ep, microbatches, self._make_stage,
                                         _TRAINER_DTYPE[self.dtype], kind, lr, wd, clip, ema_decay, _sum_pairs,
                                         _loss_scale, overlap_pairs=ep > 1, vpp=self.vpp)
        self._steps_seen = self._trainer.steps_done()

    def _make_stage(self, info):
        stage = _TorchStage(self, self.modules[self.stages.index(info.stage)], info)
        self._built.append(stage)
        return stage

    def _stage_batch(self, inputs, labels):
        n = self.dp * self.microbatches
        self._inputs = _split(inputs, n, "an input")
        self._labels = _split(labels, n, "a label tensor")

    def _before_step(self):
        """BF16/FP16: the module's parameters from the masters after a checkpoint was loaded; the masters from the
        module when a torch optimizer updates the module."""
        if not self._mixed:
            return
        loaded = self._trainer.steps_done() != self._steps_seen
        for st in self._built:
            if loaded:
                st.masters.to_module()
            elif self._optimizer == "none":
                st.masters.from_module()
        self._steps_seen = self._trainer.steps_done()

    def _after_step(self, metrics, trained=True):
        self.last_metrics = metrics
        if not trained:
            return
        overflow = self._fp16 and self._scale_after(metrics)
        if not metrics["applied"] and not overflow:
            self._bad_in_a_row += 1
            warnings.warn(metrics["not_applied"], RuntimeWarning, stacklevel=4)
        elif metrics["applied"]:
            self._bad_in_a_row = 0
        if self._mixed:
            self._steps_seen = self._trainer.steps_done()
            for st in self._built:
                if self._optimizer == "none":
                    st.masters.grads_to_module()
                else:
                    st.masters.to_module()

    def _scale_after(self, metrics):
        """FP16: a step whose loss is finite but whose gradients overflowed (not applied) halves the loss scale, down
        to 1; 2000 applied steps in a row double it. Returns whether the step was such an overflow (not counted
        towards max_bad_steps)."""
        metrics["grad_scale"] = self.grad_scale
        if not metrics["applied"] and math.isfinite(metrics["loss"]) and self.grad_scale > 1.0:
            self.grad_scale /= 2
            self._scale_good = 0
            return True
        if metrics["applied"]:
            self._scale_good += 1
            if self._scale_good >= 2000:
                self.grad_scale *= 2
                self._scale_good = 0
        return False

    def _diverged(self, metrics):
        """The DivergenceError message when max_bad_steps steps in a row were not applied, else None."""
        bad = self._bad_in_a_row
        if metrics["applied"] or not 0 < self.max_bad_steps <= bad:
            return None
        return (f"stopped after {bad} step(s) in a row that were not finite, none applied. Last: "
                f"{metrics['not_applied']}")

    def step(self, inputs, labels):
        """Runs one step on the global batch (split into DP x microbatches pieces along dim 0); returns the mean
        loss over the global batch's microbatches (each one's: last_metrics["losses"], in the batch's order).
        Gradients are left in the modules' .grad."""
        self._stage_batch(inputs, labels)
        return self._run()["loss"]

    def _run(self, forward_only=False):
        """One step (or forward-only pass) on the staged microbatches: its metrics, in last_metrics too; a step that
        was not applied warns, and after max_bad_steps in a row raises DivergenceError."""
        self._before_step()
        metrics = self._trainer.evaluate() if forward_only else self._trainer.step()
        self._after_step(metrics, trained=not forward_only)
        stop = self._diverged(metrics)
        if stop:
            raise DivergenceError(stop)
        return metrics

    def _run_chunks(self, inputs, labels, keep_outputs, forward_only):
        """_run on microbatches staged by id ({mb: input}, {mb: labels}; this rank's share); returns the losses and,
        with keep_outputs, the outputs of the microbatches whose last stage ran here, by id."""
        self._inputs, self._labels = inputs, labels
        self._chunk_losses, self._chunk_outputs, self._keep_outputs = {}, {}, keep_outputs
        self._run(forward_only)
        return self._chunk_losses, self._chunk_outputs

    def evaluate(self, inputs, labels):
        """Forward and loss only (no gradient, nothing trained, no graph kept) over the global batch, split as step()
        splits it; returns the mean loss (each microbatch's: last_metrics["losses"]). A collective."""
        self._stage_batch(inputs, labels)
        return self._run(forward_only=True)["loss"]

    def fit(self, batches, steps, save=None, save_every=0, keep=0, resume=None, on_step=None):
        """Trains until `steps` steps are done, through Duplex's training loop (the one `duplex train` runs): resumes
        from `resume` (a checkpoint directory, or a save root's newest), takes each step's global batch — the same on
        every rank — from `batches`: a function of the 1-based step returning (inputs, labels) (a resumed run then
        gets the steps it continues with), or an iterable of them (consumed from its start whatever the step), calls
        on_step(metrics) after each step, and checkpoints into `save` every `save_every` steps and at the end, keeping
        the newest `keep` (0: all). A collective: every rank calls it. With a torch optimizer, step it in on_step.
        Returns {"start", "steps_done", "first_loss", "last_loss"}."""
        it = None if callable(batches) else iter(batches)

        def before_step(step):
            x, y = batches(step) if it is None else next(it)
            self._stage_batch(x, y)
            self._before_step()

        stopped = []

        def after(metrics):
            self._after_step(metrics)
            if on_step is not None:
                on_step(metrics)
            stop = self._diverged(metrics)  # counted here (FP16's overflows aside): stops the loop before any save
            if stop:
                stopped.append(stop.replace("none applied.", "none applied; the last checkpoint is as it was."))
                raise RuntimeError(stop)

        try:
            return self._trainer.fit(int(steps), str(save or ""), int(save_every), int(keep), str(resume or ""),
                                     before_step, after, 0)
        except RuntimeError:
            if stopped:
                raise DivergenceError(stopped[-1]) from None
            raise

    def save(self, root, keep=0):
        """Checkpoints this step (a collective: every rank calls it): each rank's shard of its stages' parameters and
        buffers, the ZeroAdamW moments, the EMA and the step into root/step-NNNNNNNN, a manifest written last (an
        interrupted save never replaces a good one); keeps the newest `keep` (0: all). Returns the directory. With a
        torch optimizer, save its state_dict yourself beside it."""
        return self._trainer.save_checkpoint(str(root), keep)

    def load(self, path):
        """Resumes from a checkpoint directory, or the newest complete one under a save root (a collective, before the
        first step): verified on every rank before anything changes; another layout (DP aside) or a damaged file is
        an error naming it. Returns the step it was saved after."""
        step = self._trainer.load_checkpoint(str(path))
        self._before_step()
        return step

    def ema(self):
        """The EMA of the parameters whose owner copy lives on this rank: {"stage<s>.<name>": numpy array}."""
        return self._trainer.ema()

    def close(self):
        self._trainer.close()


def run(fn, ranks, **kwargs):
    """Runs fn(world) on `ranks` in-process ranks (threads of this process), as duplex.launch. A DualPipe or
    DualPipeV built in fn without process_group= takes fn's world."""
    def rank_main(world):
        _current.world = world
        try:
            return fn(world)
        finally:
            _current.world = None

    return _duplex.launch(rank_main, ranks=ranks, **kwargs)


from ._dualpipe import (DualPipe, DualPipeV, WeightGradStore, run_backward, set_p2p_tensor_dtype,  # noqa: E402,F401
                        set_p2p_tensor_shapes)
from ._schedules import (PipelineStage, Schedule1F1B, ScheduleDualPipe, ScheduleDualPipeV,  # noqa: E402,F401
                         ScheduleInterleaved1F1B, ScheduleZB1P)
