"""A batch of 0 samples: an empty result of the right shape, and gradients of zeros (issue 16, point 9)."""
from __future__ import annotations

import pytest
import torch

import fpidsl
from fpidsl.runtime.fixed_point import fixed_point
from fpidsl.runtime.layout import StateLayout

METHODS = ["picard", "anderson"]


def test_layout_flattens_and_unflattens_an_empty_batch():
    states = (torch.zeros(0, 3, 4), torch.zeros(0, 2))
    layout = StateLayout.of(states)
    flat = layout.flatten(states)
    assert flat.shape == (0, 14)
    back = layout.unflatten(flat)
    assert [tuple(s.shape) for s in back] == [(0, 3, 4), (0, 2)]


@pytest.mark.parametrize("method", METHODS)
def test_fixed_point_of_an_empty_batch(method):
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    a = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)

    def g(states, a, w):
        x, y = states
        return (w * x + a, 0.5 * y + x.sum(dim=-1, keepdim=True))

    x, y = fixed_point(g, (torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 1, dtype=torch.float64)), a, w,
                       method=method)
    assert x.shape == (0, 3) and y.shape == (0, 1)
    (x.sum() + y.sum()).backward()
    assert a.grad.shape == (0, 3)
    assert w.grad is not None and float(w.grad) == 0.0


@pytest.mark.parametrize("name", ["BoxProjectionNN", "BoxProjectionGD"])
def test_compiled_layer_on_an_empty_batch(name):
    torch.manual_seed(0)
    layer = fpidsl.load("specs/box_projection.fpi", name)().double()
    a = torch.randn(0, 10, dtype=torch.float64, requires_grad=True)
    out = layer(a)
    assert out.shape == (0, 10)
    out.sum().backward()
    assert a.grad.shape == (0, 10)
    grads = [p.grad for p in layer.parameters()]
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
