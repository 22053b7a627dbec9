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

Modules: a function from a stage index to its module (called for the stages the schedule places on this rank,
duplex.stages_of_rank), or a list of them in that order — one for 1f1b and zb1p (stage r), two for dualpipe and
dualpipev (stage r, then stage PP-1-r). `activation_shape` is the shape of one microbatch's
activation between stages (the same at every boundary); a stage that returns another shape is an error naming
the stage and the microbatch.
"""
import threading
import warnings
import weakref

import torch

from . import _duplex
from . import _dualpipe
from ._duplex import DivergenceError  # noqa: F401  (raised by step() and fit() on a run that diverges)

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_ELEMENT = {torch.float32: "float", torch.float64: "double"}  # Duplex's dtype names


# ---- expert parallelism: dispatch and combine as autograd functions over the stage's EP group ----

_current = threading.local()  # the stage call (duplex._duplex.StageCall) running on this thread


def _call():
    return getattr(_current, "call", None)


def _current_world():
    """The world of the duplex.torch.run rank function running on this thread (None elsewhere)."""
    return getattr(_current, "world", None)


def ep_group():
    """The expert-parallel group of the stage being run on this thread (None outside a Pipeline or without EP)."""
    call = _call()
    return None if call is None else call.ep_group


class Routed:
    """What dispatch() returns beside the rows: how combine() takes results back to their tokens.

    tags: the tags that came with the rows received here (int64, one per row; None without tags).
    crossings: rows this rank sent to ranks on other nodes in the dispatch — once per (token, slot) on the flat
    path, once per (token, target node) on the node-limited path.
    node_limited: which path the rows took."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _groups(explicit):
    """(forward group, backward group, stage call) of an explicit group (no call: plain waits) or of the stage call
    running on this thread, whose waits go through Duplex's executor."""
    if explicit is not None:
        return explicit, explicit, None
    call = _call()
    if call is None or call.ep_group is None:
        raise RuntimeError("duplex.torch.dispatch runs inside a Pipeline stage with ep > 1 (or pass group=)")
    return call.ep_group, call.ep_group_backward, call


def _exchange(group, rows, send_rows, recv_rows, what, call):
    rows = rows.contiguous()
    out = rows.new_empty((sum(recv_rows),) + tuple(rows.shape[1:]))
    group.all_to_all_v(rows.detach(), send_rows, out, recv_rows, what, call=call)
    return out


class _Move(torch.autograd.Function):
    """Rows over the expert-parallel group (all-to-all-v, send_rows[p] to rank p); the gradient runs the same
    exchange backwards on the group of backward exchanges, waited for through the stage call running it."""

    @staticmethod
    def forward(ctx, rows, explicit, send_rows, recv_rows, what):
        ctx.explicit, ctx.send_rows, ctx.recv_rows, ctx.what = explicit, send_rows, recv_rows, what
        group, _, call = _groups(explicit)
        return _exchange(group, rows, send_rows, recv_rows, what, call)

    @staticmethod
    def backward(ctx, g):
        _, group, call = _groups(ctx.explicit)
        back = _exchange(group, g, ctx.recv_rows, ctx.send_rows, ctx.what + " (backward)", call)
        return back, None, None, None, None


def _counts(group, columns, call):
    """Exchanges per-peer counts: columns are [G] int64 tensors, column j of the answer is what each peer sent
    in its column j to this rank. Returns lists."""
    send = torch.stack(columns, 1).contiguous()
    recv = torch.empty_like(send)
    group.all_to_all(send, recv, call=call)
    return [recv[:, j].tolist() for j in range(len(columns))]


def mark_experts(module):
    """Marks a module's parameters as routed-expert weights: each rank of an EP group holds its own, so their
    gradients are summed over the expert-data-parallel group (DP / EP replicas), not over DP."""
    for p in module.parameters():
        p._duplex_expert = True
    return module


def dispatch(x, dest, tags=None, node_limited=None, group=None):
    """Sends token x[n] to the ranks dest[n, k] of the stage's expert-parallel group, one row per slot k (dest [N]
    is one slot per token). Returns the rows received here and a Routed handle for combine(). Differentiable;
    inside a Pipeline stage its waits go through Duplex's executor, which runs the other half of an F&B pair
    meanwhile.

    tags (int64, shaped like dest, e.g. the expert ids) travel with the rows: routed.tags says, per row received,
    which tag it carries. Rows arrive grouped by the rank that sent them here; use the tags to find their expert.

    node_limited (default True; taken when the group spans more than one node, as every Duplex exchange does): a
    token crosses to each node it targets once, to the rank there with this rank's local index (the relay), which
    forwards one row per slot inside its node — DeepSeek-V3's dispatch. False: one row per slot straight to its
    rank. The path and the relays come from the expert-parallel plan (Communicator.expert_path, .relays).

    group: the communicator to use outside a Pipeline (default: the running stage's expert-parallel group)."""
    explicit = group
    group, _, call = _groups(explicit)
    G, N = group.size, x.shape[0]
    slots = dest.to(torch.int64).reshape(N, -1)
    K = slots.shape[1]
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= G):
        raise ValueError(f"dispatch: destinations must be ranks 0..{G - 1} of the expert-parallel group")
    if tags is not None:
        tags = tags.to(torch.int64).reshape(N, K)
        if tags.shape != slots.shape:
            raise ValueError(f"dispatch: tags of shape {tuple(tags.shape)} for destinations {tuple(dest.shape)}")
    node_limited = group.expert_path(True if node_limited is None else node_limited) == "node-limited"
    node_list = group.nodes  # one call: each builds the list in C++
    nodes = torch.tensor(node_list, dtype=torch.int64)
    token = torch.arange(N).repeat_interleave(K)  # the token of each slot (slot s = n * K + k)
    flat_dest = slots.reshape(-1)
    if not node_limited:
        order = torch.argsort(flat_dest, stable=True)
        send = torch.bincount(flat_dest, minlength=G)
        (recv,) = _counts(group, [send], call)
        send = send.tolist()
        rows = _Move.apply(x[token[order]], explicit, send, recv, "dispatch")
        got_tags = None if tags is None else _exchange(group, tags.reshape(-1)[order], send, recv, "dispatch tags", call)
        crossings = int((nodes[flat_dest] != nodes[group.rank]).sum())
        return rows, Routed(node_limited=False, explicit=explicit, tokens=N, top_k=K, order=order, send=send, recv=recv,
                            tags=got_tags, crossings=crossings)

    # Node-limited: hop 1 crosses once per (token, target node) to the relay there; hop 2 stays inside the node.
    me = group.rank
    try:
        relay_of = group.relays  # the plan's relay per destination rank
    except ValueError as e:
        raise ValueError(f"dispatch: {e} (use node_limited=False)") from None
    relay = torch.tensor(relay_of, dtype=torch.int64)[flat_dest]  # per slot
    key = relay * N + token                                        # one hop-1 row per distinct key
    keys, row_of_slot = torch.unique(key, sorted=True, return_inverse=True)
    row_relay, row_token = keys // N, keys % N
    send1 = torch.bincount(row_relay, minlength=G)
    slot_order = torch.argsort(key * K + torch.arange(N * K) % K)  # slots by (relay, token, k)
    slot_send = torch.bincount(relay, minlength=G)
    first_row = torch.cumsum(send1, 0) - send1
    meta = torch.stack([row_of_slot - first_row[relay], flat_dest,
                        tags.reshape(-1) if tags is not None else torch.zeros_like(flat_dest)], 1)[slot_order]
    recv1, slot_recv = _counts(group, [send1, slot_send], call)
    send1, slot_send = send1.tolist(), slot_send.tolist()
    rows1 = _Move.apply(x[row_token], explicit, send1, recv1, "dispatch (inter-node)")
    meta_in = _exchange(group, meta, slot_send, slot_recv, "dispatch routes", call)
    # On the relay: each slot received -> its hop-1 row here, then one row per slot to the expert's rank.
    src = torch.repeat_interleave(torch.arange(G), torch.tensor(slot_recv, dtype=torch.int64))
    recv1_t = torch.tensor(recv1, dtype=torch.int64)
    at_row = (torch.cumsum(recv1_t, 0) - recv1_t)[src] + meta_in[:, 0]
    dest2 = meta_in[:, 1]
    if dest2.numel() and bool((nodes[dest2] != nodes[me]).any()):
        raise RuntimeError(f"dispatch: rank {me} was asked to relay a row outside its node (inconsistent topology)")
    order2 = torch.argsort(dest2, stable=True)
    send2 = torch.bincount(dest2, minlength=G)
    (recv2,) = _counts(group, [send2], call)
    send2 = send2.tolist()
    rows = _Move.apply(rows1[at_row[order2]], explicit, send2, recv2, "dispatch (intra-node)")
    got_tags = None if tags is None else _exchange(group, meta_in[order2, 2], send2, recv2, "dispatch tags", call)
    crossings = int((nodes[row_relay] != nodes[me]).sum())
    return rows, Routed(node_limited=True, explicit=explicit, tokens=N, top_k=K, rows1=len(keys), row_token=row_token,
                        send1=send1, recv1=recv1, slot_order=slot_order, slot_send=slot_send, slot_recv=slot_recv,
                        at_row=at_row, order2=order2, send2=send2, recv2=recv2, tags=got_tags, crossings=crossings)


def combine(rows, routed, weights=None):
    """Takes the rows dispatch() delivered here (or results computed from them, one per row, same order) back to
    their tokens: returns [N, ...] in the order of dispatch's x, the sum over each token's slots of
    weights[n, k] * result (weights shaped like dest; default 1). On the node-limited path the relay adds up the
    weighted results of its node before the one crossing back. Differentiable (in rows and weights)."""
    r, explicit = routed, routed.explicit
    rest = tuple(rows.shape[1:])
    if weights is not None:
        weights = weights.reshape(r.tokens * r.top_k)
    if not r.node_limited:
        back = _Move.apply(rows, explicit, r.recv, r.send, "combine")
        res = back[torch.argsort(r.order)].reshape((r.tokens, r.top_k) + rest)
        if weights is not None:
            res = res * weights.reshape((r.tokens, r.top_k) + (1,) * len(rest))
        return res.sum(1)
    back = _Move.apply(rows, explicit, r.recv2, r.send2, "combine (intra-node)")  # on the relay, one per slot
    out = back[torch.argsort(r.order2)]                                       # in the order the slots came
    if weights is not None:
        w = _Move.apply(weights[r.slot_order].contiguous(), explicit, r.slot_send, r.slot_recv, "combine weights")
        out = out * w.reshape((-1,) + (1,) * len(rest))
    partial = out.new_zeros((sum(r.recv1),) + rest).index_add(0, r.at_row, out)  # one row per (token, node)
    home = _Move.apply(partial, explicit, r.recv1, r.send1, "combine (inter-node)")
    return home.new_zeros((r.tokens,) + rest).index_add(0, r.row_token, home)


class _TorchStage:
    """One stage module behind the Stage contract (called from Duplex's executor threads, under the GIL)."""

    def __init__(self, pipe, module, info):
        # A weak reference: the executor (C++) holds this stage, the Pipeline holds the executor.
        self.pipe, self.module, self.info = weakref.proxy(pipe), module, info
        self.first = info.stage == 0
        self.last = info.stage == info.num_stages - 1
        self.saved = {}  # mb -> (input that needs a gradient or None, output or scaled loss, output gradient)
        self.deferred = {}  # mb -> weight-gradient closures custom functions deferred during B
        self.losses = {}
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.zero_grad()

    def name(self):
        return f"torch stage {self.info.stage} ({type(self.module).__name__})"

    def activation(self, mb):
        return list(self.pipe.activation_shape), _ELEMENT[self.pipe.dtype]

    def _run(self, inp):
        return self.module(*inp) if isinstance(inp, tuple) else self.module(inp)

    def _loss(self, mb, global_mb, out):
        loss = self.pipe.loss_fn(out, self.pipe._labels[global_mb])
        if loss.dim() != 0:
            raise ValueError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}, not a scalar")
        self.losses[mb] = float(loss.detach())
        if self.pipe._chunk_losses is not None:  # DualPipe's step returns them (and the outputs)
            self.pipe._chunk_losses[global_mb] = loss.detach()
            if self.pipe._keep_outputs:
                self.pipe._chunk_outputs[global_mb] = out.detach()
        return loss

    def forward(self, mb, global_mb, step, x, call):
        _current.call = call
        if call is not None and call.forward_only:  # evaluation: nothing kept for a backward
            with torch.no_grad():
                out = self._run(self.pipe._inputs[global_mb] if self.first else x)
                if not self.last:
                    return out.contiguous()
                self._loss(mb, global_mb, out)
                return None
        if self.first:
            inp = self.pipe._inputs[global_mb]
        else:
            inp = x.detach().requires_grad_(True)
        out = self._run(inp)
        if self.last:
            loss = self._loss(mb, global_mb, out)
            self.saved[mb] = [None if self.first else inp, loss * self.info.loss_scale, None]
            return None
        self.saved[mb] = [None if self.first else inp, out, None]
        return out.detach().contiguous()

    def loss(self, mb):
        return self.losses.pop(mb)

    def backward_input(self, mb, dy, weight_follows, call):
        _current.call = call
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
        # Custom autograd functions that defer their weight gradients (WeightGradStore) put them here; W runs them.
        with _dualpipe.deferring() as deferred:
            (dx,) = torch.autograd.grad(out, [inp], grad_out, retain_graph=True)
        self.deferred[mb] = deferred
        return dx.contiguous()

    def backward_weight(self, mb, call):
        _current.call = call
        inp, out, grad_out = self.saved.pop(mb)
        if isinstance(grad_out, str):  # done together with B
            return
        deferred = self.deferred.pop(mb, None)
        if deferred is None:  # no B ran (the first stage): custom functions accumulate as autograd reaches them
            self._accumulate(torch.autograd.grad(out, self.params, grad_out, allow_unused=True))
            return
        with _dualpipe.deferring():  # this second pass puts the same closures again: dropped
            grads = torch.autograd.grad(out, self.params, grad_out, allow_unused=True)
        self._accumulate(grads)
        for f in deferred:
            f()

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
        for name, b in self.module.named_buffers():  # checkpointed with the parameters (running statistics, ...)
            if b.is_contiguous() and b.device.type == "cpu":
                out.append((f"stage{self.info.stage}.buffer.{name}", b.data, None, False, False))
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
    parameters). ema_decay > 0 keeps an EMA of the weights in host memory, updated in the background (ema()).

    A step whose loss or gradient norm is not finite is not applied: ZeroAdamW leaves the parameters and its
    moments, and the EMA, as they were; last_metrics["applied"] is False and a RuntimeWarning says where it
    started (rank, stage, microbatch, the first parameter whose gradient is not finite). With a torch optimizer,
    skip its step when last_metrics["applied"] is False. After max_bad_steps such steps in a row (0: never),
    step() and fit() raise DivergenceError (fit keeps its last checkpoint as it was)."""

    def __init__(self, world, modules, schedule="1f1b", pp=None, dp=1, microbatches=4, loss_fn=None,
                 activation_shape=None, dtype=None, optimizer=None, ema_decay=0.0, ep=1, max_bad_steps=3,
                 _sum_pairs=True, _loss_scale=0.0):
        if loss_fn is None:
            raise ValueError("Pipeline needs a loss_fn(output, labels) -> scalar tensor")
        if int(max_bad_steps) < 0:
            raise ValueError(f"max_bad_steps must be 0 or more, got {max_bad_steps}")
        if activation_shape is None:
            raise ValueError("Pipeline needs activation_shape: one microbatch's activation between stages")
        self.schedule, self.dp, self.microbatches = schedule, dp, microbatches
        ranks_per_replica = world.size // dp
        folded = schedule in ("dualpipev",)
        self.pp = pp if pp is not None else (2 * ranks_per_replica if folded else ranks_per_replica)
        self.pipe_rank = world.rank // dp
        self.stages = _duplex.stages_of_rank(schedule, self.pp, self.pipe_rank)  # this rank's, its own first
        self.modules = [modules(s) for s in self.stages] if callable(modules) else list(modules)
        if len(self.modules) != len(self.stages):
            raise ValueError(f"{schedule} places {len(self.stages)} stage(s) on each rank (here {self.stages}); got "
                             f"{len(self.modules)} modules")
        self.loss_fn = loss_fn
        self.max_bad_steps = int(max_bad_steps)
        self.activation_shape = tuple(activation_shape)
        params = [p for m in self.modules for p in m.parameters()]
        self.dtype = dtype or (params[0].dtype if params else torch.float32)
        if self.dtype not in _DTYPES:
            raise ValueError(f"parameters of {self.dtype}: the trainer runs float32 or float64")
        self._inputs = self._labels = None
        self._chunk_losses = self._chunk_outputs = None  # DualPipe's step: per-chunk losses and outputs kept here
        self._keep_outputs = False
        if optimizer is None:
            kind, lr, wd, clip = "none", 1e-3, 0.0, 0.0
        elif isinstance(optimizer, ZeroAdamW):
            kind, lr, wd, clip = "zero1-adamw", optimizer.lr, optimizer.weight_decay, optimizer.clip
        else:
            raise ValueError("optimizer: None (use a torch optimizer on .grad) or duplex.torch.ZeroAdamW(...)")
        self._trainer = _duplex._Trainer(world, schedule, self.pp, dp, ep, microbatches, self._make_stage,
                                         _DTYPES[self.dtype], kind, lr, wd, clip, ema_decay, _sum_pairs, _loss_scale)

    def _make_stage(self, info):
        return _TorchStage(self, self.modules[self.stages.index(info.stage)], info)

    def _stage_batch(self, inputs, labels):
        n = self.dp * self.microbatches
        if inputs.shape[0] % n or labels.shape[0] % n:
            raise ValueError(f"a batch of {inputs.shape[0]} does not split into {n} microbatches")
        self._inputs = list(torch.chunk(inputs, n))
        self._labels = list(torch.chunk(labels, n))

    def step(self, inputs, labels):
        """Runs one step on the global batch (split into DP x microbatches pieces along dim 0); returns the mean
        loss over the global batch's microbatches (each one's: last_metrics["losses"], in the batch's order).
        Gradients are left in the modules' .grad."""
        self._stage_batch(inputs, labels)
        return self._run()["loss"]

    def _run(self, forward_only=False):
        """One step (or forward-only pass) on the staged microbatches: its metrics, in last_metrics too; a step that
        was not applied warns, and after max_bad_steps in a row raises DivergenceError."""
        metrics = self._trainer.evaluate() if forward_only else self._trainer.step()
        self.last_metrics = metrics
        if not metrics["applied"]:
            warnings.warn(metrics["not_applied"], RuntimeWarning, stacklevel=3)
            if 0 < self.max_bad_steps <= metrics["bad_steps_in_a_row"]:
                raise DivergenceError(f"stopped after {metrics['bad_steps_in_a_row']} step(s) in a row that were not "
                                      f"finite, none applied. Last: {metrics['not_applied']}")
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

        def after(metrics):
            self.last_metrics = metrics
            if not metrics["applied"]:
                warnings.warn(metrics["not_applied"], RuntimeWarning, stacklevel=2)
            if on_step is not None:
                on_step(metrics)

        return self._trainer.fit(int(steps), str(save or ""), int(save_every), int(keep), str(resume or ""),
                                 before_step, after, self.max_bad_steps)

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
        return self._trainer.load_checkpoint(str(path))

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
                         ScheduleZB1P)
