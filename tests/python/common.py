"""Helpers shared by the duplex.torch tests (run as scripts: this directory is on sys.path)."""


def train_pipeline(pipe, opt, batches, per_microbatch=None):
    """Steps a duplex.torch Pipeline over `batches` (one (inputs, labels) per step) with a torch optimizer on the
    gradients it leaves in .grad; closes it; returns each step's loss (and appends each step's per-microbatch
    losses to `per_microbatch` when given)."""
    losses = []
    for inputs, labels in batches:
        losses.append(pipe.step(inputs, labels))
        if per_microbatch is not None:
            per_microbatch.append(pipe.last_metrics["losses"])
        opt.step()
        opt.zero_grad()
    pipe.close()
    return losses
