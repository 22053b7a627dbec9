"""Helpers shared by the duplex.torch tests (run as scripts: this directory is on sys.path)."""


def train_pipeline(pipe, opt, batches):
    """Steps a duplex.torch Pipeline over `batches` (one (inputs, labels) per step) with a torch optimizer on the
    gradients it leaves in .grad; closes it; returns each step's loss."""
    losses = []
    for inputs, labels in batches:
        losses.append(pipe.step(inputs, labels))
        opt.step()
        opt.zero_grad()
    pipe.close()
    return losses
