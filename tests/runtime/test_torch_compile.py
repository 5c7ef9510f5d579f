"""torch.compile of a model containing a compiled layer: the solve is not traced (a few graph breaks, not one
per solver iteration) and outputs and gradients are the eager ones. Dynamo only (backend="eager"): fast."""
import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import fpidsl

# dynamo itself reads .grad of the non-leaf tensor a graph break returns (any torch.compiler.disable'd call)
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(10, 10)
        self.layer = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")()

    def forward(self, a):
        return self.layer(torch.tanh(self.encoder(a))).square().sum()


def test_compiled_model_matches_eager_and_does_not_trace_the_solver():
    model = Model()
    a = torch.randn(16, 10)
    eager = model(a)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    out = compiled(a)
    grads = torch.autograd.grad(out, list(model.parameters()))
    assert torch.equal(out, eager)
    for g, e in zip(grads, eager_grads):
        assert torch.equal(g, e)
    breaks = dynamo.explain(model)(a).graph_break_count
    assert breaks == 1, f"{breaks} graph breaks: dynamo traced into the layer (41 when it traces the solver)"
