"""duplex._backward.SplitBackward (a Python stage's B keeping the gradients at the graph's branch points, W walking
only the parameter branches) against one plain torch.autograd.grad over inputs and parameters together, fp64 1e-12:
an MLP, a residual block whose output also depends on a parameter alone, a custom autograd function, a weight used
twice (no plan: W falls back to a second pass); then duplex.torch pipelines with the split forced on, every schedule
that splits B and W, equal to plain PyTorch."""
import unittest

import torch

import duplex.torch as dt
from duplex._backward import SplitBackward

torch.set_default_dtype(torch.float64)


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
        self.gain = torch.nn.Parameter(torch.randn(6))
        self.offset = torch.nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = x + torch.tanh(self.b(torch.relu(self.a(x))))
        return Scale.apply(h, self.gain) + self.offset.exp()  # offset: a branch that reaches a parameter only


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class Plans(unittest.TestCase):
    def check(self, module, expect_plan=True):
        torch.manual_seed(0)
        x = torch.randn(5, 6, requires_grad=True)
        params = list(module.parameters())
        y = module(x)
        g = torch.randn_like(y)
        want = torch.autograd.grad(y, [x] + params, g)
        y = module(x)
        split = SplitBackward.plan([y], [x], params)
        if not expect_plan:
            self.assertIsNone(split)
            return
        self.assertIsNotNone(split)
        (dx,) = split.backward_input([g])
        got = split.backward_weight()
        self.assertLessEqual(float((dx - want[0]).norm() / want[0].norm()), 1e-12, "input")
        for p, have, ref in zip(params, got, want[1:]):
            self.assertIsNotNone(have)
            self.assertLessEqual(float((have - ref).norm() / ref.norm()), 1e-12, str(p.shape))

    def test_mlp(self):
        self.check(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(),
                                       torch.nn.Linear(6, 6)))

    def test_residual_custom_function_and_parameter_only_branch(self):
        self.check(Residual())

    def test_a_weight_used_twice_has_no_plan(self):
        self.check(Tied(), expect_plan=False)

    def test_the_weight_pass_walks_only_the_parameter_branches(self):
        # Counting the nodes W runs: none of the input side (the Tanh between the two Linears) runs again.
        m = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6))
        x = torch.randn(5, 6, requires_grad=True)
        y = m(x)
        split = SplitBackward.plan([y], [x], list(m.parameters()))
        split.backward_input([torch.ones_like(y)])
        ran = []
        tanh = y.grad_fn.next_functions[1][0]  # the last Linear's input
        self.assertEqual(type(tanh).__name__, "TanhBackward0")
        tanh.register_prehook(lambda grads: ran.append("tanh"))
        split.backward_weight()
        self.assertEqual(ran, [])


class ForcedInPipelines(unittest.TestCase):
    def test_pipelines_with_the_split(self):
        import test_torch_boundaries as boundaries
        saved = dt._TorchStage._split_plan
        dt._TorchStage._split_plan = lambda self, outs, wanted: SplitBackward.plan(outs, wanted, self.params)
        try:
            case = boundaries.SeveralTensors()
            for schedule in ["zb1p", "dualpipe", "dualpipev"]:
                with self.subTest(schedule=schedule):
                    case.check(schedule, 4, 2)
        finally:
            dt._TorchStage._split_plan = saved


if __name__ == "__main__":
    unittest.main(verbosity=2)
