"""The opt-in `compile=True`: the step and the emitted backward map through torch.compile (inductor, on the
CPU here) give the eager results; higher orders fall back to the eager code and stay exact."""
from __future__ import annotations

import pytest
import torch

import fpidsl

# torch.compile's own internals warn (torch.jit deprecation; dynamo reading .grad of non-leaf tensors while
# tracing); the warnings are torch's, not about this code.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script.*is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(r"ignore:The \.grad attribute of a Tensor that is not a leaf:UserWarning"),
]


def test_compiled_layer_matches_eager():
    cls = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")
    torch.manual_seed(0)
    eager = cls()
    torch.manual_seed(0)
    fast = cls(compile=True)
    assert fast.compiled and not eager.compiled
    a = torch.randn(16, 10)
    y_fast, y_eager = fast(a), eager(a)
    assert torch.allclose(y_fast, y_eager, rtol=1e-5, atol=1e-6)
    y_fast.square().sum().backward()
    y_eager.square().sum().backward()
    for p, q in zip(fast.parameters(), eager.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    # second order: recorded through the eager code
    a2 = torch.randn(4, 10, requires_grad=True)
    (g_fast,) = torch.autograd.grad(fast(a2).sum(), a2, create_graph=True)
    (g_eager,) = torch.autograd.grad(eager(a2).sum(), a2, create_graph=True)
    (h_fast,) = torch.autograd.grad(g_fast.square().sum(), a2)
    (h_eager,) = torch.autograd.grad(g_eager.square().sum(), a2)
    assert torch.allclose(h_fast, h_eager, rtol=1e-4, atol=1e-6)


def test_compiled_layer_with_dropout_matches_eager_in_train_and_eval_mode(tmp_path):
    """The solve's dropout masks under torch.compile: made by the graph, not cached on the seeds (dynamo cannot
    trace the cache; the call once failed with an InternalTorchDynamoError)."""
    path = tmp_path / "dropped.fpi"
    path.write_text("""
layer Dropped {
  input a : [B, 4]
  state x : [B, 4] = zeros
  param fc : Linear(8, 4, init_scale=0.5)
  update x = 0.5 * tanh(fc(dropout(cat([x, a], dim=-1), p=0.3)))
}
""")
    cls = fpidsl.load(path)
    tight = {"tol": 1e-12}
    eager = cls(solve=tight, backward=tight).double()
    fast = cls(solve=tight, backward=tight, compile=True).double()
    fast.load_state_dict(eager.state_dict())
    a = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    for train in (True, False):
        results = []
        for layer in (eager, fast):
            layer.train(train)
            layer.zero_grad()
            torch.manual_seed(3)  # the same seeds, so the same masks
            y = layer(a)
            (w * y).sum().backward()
            results.append((y.detach(), [p.grad for p in layer.parameters()]))
        (y_eager, g_eager), (y_fast, g_fast) = results
        torch.testing.assert_close(y_fast, y_eager, rtol=1e-10, atol=1e-12)
        for p, q in zip(g_fast, g_eager):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    eager.train()
    torch.manual_seed(3)
    assert not torch.allclose(eager(a), eager.eval()(a))  # the train-mode masks changed the map
