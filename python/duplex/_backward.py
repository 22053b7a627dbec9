"""A Python stage's backward split in two without doing the input side twice. B computes the gradients of the
stage's inputs and keeps, at every node of the graph where a branch leads to parameters only (a Linear's
matmul, whose other branch goes on towards the input), the gradient that arrived there; W starts from those nodes
and walks only their parameter branches. A second full pass from the outputs to the parameters would recompute
every input-side gradient down to the lowest weight.

    split = SplitBackward.plan(outputs, inputs, params)   # None: the graph shares a parameter between branches
    input_grads = split.backward_input(grad_outputs)      # B
    weight_grads = split.backward_weight()                # W: one per parameter (None where unused)

Nodes are found by their reach: whether a stage input, a parameter, or both lie below them. A node that reaches both
and has a child that reaches parameters only is where W starts (its parameters: those below such children); an
output that reaches parameters only starts W itself. Each start runs on its own (torch.autograd.grad to its own
parameters), so one start's walk never adds into another's parameters through the input side."""
import torch
from torch.autograd.graph import GradientEdge

_INPUT, _PARAM = 1, 2


def _walk(roots, input_ids, param_ids):
    """(reach by node id, node by id, children by id) of the graph below `roots`, depth first, children first."""
    reach, nodes, kids = {}, {}, {}
    stack = [(r, False) for r in roots if r is not None]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            bits = 0
            for c in kids[key]:
                bits |= reach[id(c)]
            leaf = getattr(node, "variable", None)  # an AccumulateGrad: a leaf tensor
            if leaf is not None:
                bits |= _INPUT if id(leaf) in input_ids else _PARAM if id(leaf) in param_ids else 0
            reach[key] = bits
            continue
        if key in nodes:
            continue
        nodes[key] = node
        kids[key] = [c for c, _ in node.next_functions if c is not None]
        stack.append((node, True))
        stack.extend((c, False) for c in kids[key] if id(c) not in nodes)
    return reach, nodes, kids


def _params_below(start, kids, param_index):
    found, stack, seen = set(), [start], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        leaf = getattr(node, "variable", None)
        if leaf is not None and id(leaf) in param_index:
            found.add(param_index[id(leaf)])
        stack.extend(kids.get(id(node), ()))
    return found


class SplitBackward:
    def __init__(self, outputs, inputs, params, starts):
        self.outputs, self.inputs, self.params, self.starts = outputs, inputs, params, starts
        self.arrived = {}  # start node id -> the gradients that reached it in B

    @classmethod
    def plan(cls, outputs, inputs, params):
        param_index = {id(p): i for i, p in enumerate(params)}
        roots = [o.grad_fn for o in outputs]
        if any(r is None for r in roots):
            return None
        reach, nodes, kids = _walk(roots, {id(t) for t in inputs}, param_index)
        starts, owned = [], {}
        for key, node in nodes.items():
            if reach[key] != _INPUT | _PARAM:
                continue
            below = set()
            for c in kids[key]:
                if reach[id(c)] == _PARAM:
                    below |= _params_below(c, kids, param_index)
            if below:
                starts.append((node, None, sorted(below)))
        for i, r in enumerate(roots):
            if reach[id(r)] == _PARAM:
                starts.append((None, i, sorted(_params_below(r, kids, param_index))))
        for _, _, below in starts:
            for p in below:
                if p in owned:  # a parameter under two starts (tied weights): W from one would add the other's
                    return None
                owned[p] = True
        return cls(outputs, inputs, params, starts)

    def backward_input(self, grad_outputs):
        """The inputs' gradients (B), keeping what arrives at each start."""
        hooks = []
        for node, _, _ in self.starts:
            if node is not None:
                hooks.append(node.register_prehook(lambda grads, key=id(node): self.arrived.__setitem__(key, grads)))
        try:
            got = torch.autograd.grad(self.outputs, self.inputs, grad_outputs, retain_graph=True, allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
        self.grad_outputs = grad_outputs
        return got

    def backward_weight(self):
        """Every parameter's gradient (W), from the starts; None where none reaches it."""
        grads = [None] * len(self.params)
        for node, output, below in self.starts:
            if node is None:
                edges = [self.outputs[output]]
                given = None if self.grad_outputs is None else [self.grad_outputs[output]]
            else:
                arrived = self.arrived.get(id(node))
                if arrived is None:
                    continue  # no gradient reached it in B (nothing below it counts)
                pairs = [(GradientEdge(node, i), g) for i, g in enumerate(arrived) if g is not None]
                if not pairs:
                    continue
                edges, given = [e for e, _ in pairs], [g for _, g in pairs]
            got = torch.autograd.grad(edges, [self.params[p] for p in below], given, allow_unused=True)
            for p, g in zip(below, got):
                if g is not None:
                    grads[p] = g if grads[p] is None else grads[p] + g
        return grads
