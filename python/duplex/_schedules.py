"""torch.distributed.pipelining's interface on Duplex's executor: PipelineStage and schedules whose step() and
eval() take the arguments torch's do, so a pipelining script switches by its import and its schedule name.

    stage = PipelineStage(module, stage_index, num_stages, device)          # one stage per rank
    schedule = Schedule1F1B(stage, n_microbatches=8, loss_fn=loss_fn)        # or ScheduleZB1P
    stages = [PipelineStage(m, i, num_stages, device) for m, i in mine]      # two per rank
    schedule = ScheduleDualPipeV(stages, n_microbatches=8, loss_fn=loss_fn)  # or ScheduleDualPipe
    stages = [PipelineStage(m, r + k * ranks, num_stages, device) for k, m in enumerate(chunks)]  # v per rank
    schedule = ScheduleInterleaved1F1B(stages, n_microbatches=8, loss_fn=loss_fn)
    output = schedule.step(x, target=y, losses=losses)   # x on the first stage's rank, y on the last's

As torch's: the whole batch is split into n_microbatches along dim 0; the last stage's rank gets the merged
outputs (None elsewhere) and, with losses=[...], each microbatch's loss appended (ScheduleDualPipe holds the first
and the last stage on two ranks each, one per direction: each passes the whole batch and gets the losses and
outputs of the microbatches whose last stage it ran — the second half on rank 0, the first on the last rank);
gradients accumulate in .grad, divided by n_microbatches when scale_grads (the default; False: the losses'
gradients summed); eval() runs forward and loss only. The stages' ranks: under torchrun (after
torch.distributed.init_process_group) this process's Duplex world, in a duplex.torch.run rank function its world,
or group= a Duplex communicator. Several inputs (step(x, positions, ...)) go to the first stage as positional
arguments; a stage may return a tuple of tensors (the next stage's arguments), of any shapes and dtypes, which may
change from step to step.
"""
import torch

from ._dualpipe import _merge
from ._process_world import group_world


class PipelineStage:
    def __init__(self, submodule, stage_index, num_stages, device=None, input_args=None, output_args=None,
                 group=None, dw_builder=None):
        self.submod, self.stage_index, self.num_stages = submodule, stage_index, num_stages
        self.device = device
        self.group = group_world(group, "PipelineStage")
        if not 0 <= stage_index < num_stages:
            raise ValueError(f"stage_index {stage_index} outside 0..{num_stages - 1}")


class _Schedule:
    kind = None  # Duplex's schedule name

    def __init__(self, stages, n_microbatches, loss_fn=None, scale_grads=True, **unsupported):
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported arguments {sorted(unsupported)}")
        if loss_fn is None:
            raise ValueError(f"{type(self).__name__} needs a loss_fn(output, target)")
        self.stages = stages if isinstance(stages, (list, tuple)) else [stages]
        self.n, self.loss_fn, self.scale_grads = n_microbatches, loss_fn, scale_grads
        self.world = self.stages[0].group
        self.num_stages = self.stages[0].num_stages
        self._pipe = None

    def _mine(self):
        return {s.stage_index: s for s in self.stages}

    def _vpp(self):
        return 1

    def _pipeline(self):
        if self._pipe is None:
            from . import torch as dt
            mine = self._mine()
            params = [p for s in self.stages for p in s.submod.parameters()]
            self._pipe = dt.Pipeline(self.world, lambda s: self._stage(mine, s).submod, schedule=self.kind,
                                     pp=self.num_stages, vpp=self._vpp(), microbatches=self.n, loss_fn=self.loss_fn,
                                     dtype=params[0].dtype if params else torch.float32,
                                     _loss_scale=1.0 / self.n if self.scale_grads else 1.0)
        return self._pipe

    def _stage(self, mine, index):
        if index not in mine:
            raise ValueError(f"{type(self).__name__}: the schedule places stage {index} on this rank, whose "
                             f"PipelineStages are {sorted(mine)}")
        return mine[index]

    def _run(self, args, target, losses, return_outputs, forward_only):
        pipe = self._pipeline()
        mine = self._mine()
        first, last = 0 in mine, self.num_stages - 1 in mine
        if first and not args:
            raise ValueError("step(): the first stage's rank passes the batch's inputs")
        if last and target is None:
            raise ValueError("step(): the last stage's rank passes target=")
        inputs = {}
        if first:
            parts = [a.tensor_split(self.n, dim=0) for a in args]
            inputs = {mb: parts[0][mb] if len(args) == 1 else tuple(p[mb] for p in parts) for mb in range(self.n)}
        got, outs = pipe._run_chunks(inputs, dict(enumerate(target.tensor_split(self.n, dim=0))) if last else {},
                                     return_outputs, forward_only)
        if not last:
            return None
        order = sorted(got)
        if losses is not None:
            losses.extend(got[mb] for mb in order)
        return _merge([outs[mb] for mb in order], 0) if return_outputs else None

    def step(self, *args, target=None, losses=None, return_outputs=True):
        """One training step: the batch split into n_microbatches; outputs merged on the last stage's rank."""
        return self._run(args, target, losses, return_outputs, forward_only=False)

    def eval(self, *args, target=None, losses=None, return_outputs=True):
        """Forward and loss only, no gradients."""
        return self._run(args, target, losses, return_outputs, forward_only=True)

    def close(self):
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None


class Schedule1F1B(_Schedule):
    kind = "1f1b"


class ScheduleZB1P(_Schedule):
    """Zero-bubble 1P (ZB-H1): Duplex's schedule of that name, one stage per rank."""
    kind = "zb1p"


class ScheduleDualPipe(_Schedule):
    """DualPipe: two stages per rank, r and num_stages-1-r."""
    kind = "dualpipe"


class ScheduleDualPipeV(_Schedule):
    """DualPipeV: two stages per rank, r and num_stages-1-r, num_stages / 2 ranks."""
    kind = "dualpipev"


class ScheduleInterleaved1F1B(_Schedule):
    """Interleaved 1F1B (Megatron's virtual pipeline): each rank holds len(stages) stages, stage s on rank
    s % (num_stages / len(stages)), as torch's loop placement; n_microbatches a multiple of the ranks."""
    kind = "interleaved"

    def _vpp(self):
        return len(self.stages)
