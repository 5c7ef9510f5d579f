"""A compiled layer reads its modules' weights without calling them: torch.nn.utils.spectral_norm and weight_norm
(the hook-based forms, which recompute ``weight`` in a forward pre-hook) were silently ignored (the layer ran with a
stale weight, ``weight_orig`` got no gradient: 1.0 relative off); they run once a call now, and any other hook of
such a module is refused (a helper's probe)."""
from __future__ import annotations

import pytest
import torch

import fpidsl

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 1000}


@pytest.fixture(scope="module")
def layer_class():
    return fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")


def unrolled(layer, a, steps=600):
    """The map iterated with its modules called (their hooks run): the oracle."""
    x = torch.zeros_like(a)
    for _ in range(steps):
        x = layer.fc2(torch.relu(layer.fc1(torch.cat([x, a], -1))))
    return x


def test_a_hook_based_spectral_norm_is_followed(layer_class):
    torch.manual_seed(0)
    layer = layer_class(solve=TIGHT, backward=TIGHT).double()
    torch.nn.utils.spectral_norm(layer.fc2)
    layer.eval()  # no power iteration: the oracle sees the same u, v
    a = torch.randn(4, 10, dtype=DT, generator=torch.Generator().manual_seed(1))
    y = layer(a)
    want = unrolled(layer, a)
    assert torch.allclose(y.detach(), want.detach(), rtol=0, atol=1e-10)
    (g,) = torch.autograd.grad(y.square().sum(), layer.fc2.weight_orig)
    (g_want,) = torch.autograd.grad(want.square().sum(), layer.fc2.weight_orig)
    assert torch.allclose(g, g_want, rtol=1e-8, atol=1e-10)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_a_hook_based_weight_norm_is_followed(layer_class):
    torch.manual_seed(0)
    layer = layer_class(solve=TIGHT, backward=TIGHT).double()
    torch.nn.utils.weight_norm(layer.fc2)
    a = torch.randn(4, 10, dtype=DT, generator=torch.Generator().manual_seed(2))
    before = layer(a).detach()
    with torch.no_grad():
        layer.fc2.weight_g.mul_(0.5)  # the effective weight halves: the layer saw the old one
    y = layer(a)
    assert not torch.allclose(y.detach(), before)
    assert torch.allclose(y.detach(), unrolled(layer, a).detach(), rtol=0, atol=1e-10)
    (g,) = torch.autograd.grad(y.sum(), layer.fc2.weight_g)
    assert float(g.abs().sum()) > 0


def test_other_hooks_of_its_modules_are_refused(layer_class):
    layer = layer_class().double()
    a = torch.randn(2, 10, dtype=DT)
    handle = layer.fc1.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(RuntimeError, match="the module 'fc1' has a forward hook, which the compiled layer does not run"):
        layer(a)
    handle.remove()
    handle = layer.fc2.register_forward_pre_hook(lambda m, i: None)
    with pytest.raises(RuntimeError, match="the module 'fc2' has a forward pre-hook.*torch.nn.utils.parametrizations"):
        layer(a)
    handle.remove()
    layer(a)  # no hooks: runs
