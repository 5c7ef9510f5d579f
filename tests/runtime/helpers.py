"""Shared oracles for the runtime tests: maps with known fixed points, unrolled iteration, nested derivatives."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fpidsl.runtime import fixed_point

DTYPE = torch.float64


TIGHT = {"tol": 1e-13, "max_iter": 2000}
TIGHT_BACKWARD = {"tol": 1e-13, "max_iter": 2000}


def rel_err(a: Tensor, b: Tensor) -> float:
    """``|a - b| / |b|`` (absolute when ``b`` is zero)."""
    a, b = a.detach(), b.detach()
    scale = torch.linalg.vector_norm(b)
    diff = torch.linalg.vector_norm(a - b)
    return float(diff / scale) if scale > 0 else float(diff)


def max_rel_err(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> float:
    assert len(xs) == len(ys)
    return max(rel_err(a, b) for a, b in zip(xs, ys))


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, scale: float = 1.0, gen: torch.Generator, grad: bool = True) -> Tensor:
    t = scale * torch.randn(*shape, generator=gen, dtype=DTYPE)
    return t.requires_grad_(grad)


def as_tuple(x) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def unrolled(f: Callable, x0, args: Sequence, steps: int):
    """``steps`` applications of ``f`` from ``x0``, recorded by autograd (the oracle for a contraction)."""
    x = x0
    for _ in range(steps):
        x = f(x, *args)
    return x


def derivatives(loss: Callable[[], Tensor], params: Sequence[Tensor], order: int = 3, seed: int = 123):
    """The derivatives of ``loss()`` with respect to ``params``, orders 1..``order``, contracted with fixed random
    directions between orders: ``D1 = dL/dp``, ``D2 = d<D1, v1>/dp``, ``D3 = d<D2, v2>/dp``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    value = loss()
    for k in range(1, order + 1):
        grads = torch.autograd.grad(value, params, create_graph=k < order, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
        out.append(tuple(g.detach() for g in grads))
        if k < order:
            directions = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
            value = sum((g * v).sum() for g, v in zip(grads, directions))
    return out


def assert_orders_close(got, want, rtol: float = 1e-8) -> None:
    for k, (a, b) in enumerate(zip(got, want), start=1):
        err = max_rel_err(a, b)
        assert err <= rtol, f"order {k}: relative error {err:.3g} > {rtol}"


def smooth_loss(x, gen_seed: int = 7) -> Tensor:
    """A nonlinear loss of the fixed point (so that dL/dx depends on x as well)."""
    xs = as_tuple(x)
    gen = torch.Generator().manual_seed(gen_seed)
    total = 0
    for t in xs:
        w = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        total = total + (torch.sin(t) * w).sum() + 0.5 * (t * t).sum()
    return total


# ---------------------------------------------------------------------------------------------------------------
# Maps


def linear_map(x, A, B, z):
    """g(x) = A x + B z per sample; the fixed point is (I - A)^-1 B z."""
    return x @ A.T + z @ B.T


def linear_closed_form(A, B, z):
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(eye - A, (z @ B.T).T).T


def tanh_layers(x, W1, U, b1, W2, b2, z):
    """Two tanh layers: h = tanh(W1 x + U z + b1), g = tanh(W2 h + b2)."""
    h = torch.tanh(x @ W1.T + z @ U.T + b1)
    return torch.tanh(h @ W2.T + b2)


def conv_map(x, K, Kz, z):
    """A convolutional map: g = tanh(K * x + Kz * z), 3x3 kernels, same padding."""
    return torch.tanh(F.conv2d(x, K, padding=1) + F.conv2d(z, Kz, padding=1))


def two_state_map(xy, W, V, z):
    """Two states iterated together: x <- tanh(W y + z), y <- 0.5 sin(x) + V y."""
    x, y = xy
    return torch.tanh(y @ W.T + z), 0.5 * torch.sin(x) + y @ V.T


def tanh_map(x, W, U, z):
    """g = tanh(x W^T + z U^T), the map of the hand-written adjoint test."""
    return torch.tanh(x @ W.T + z @ U.T)


def solve(f, x0, *args, **settings):
    merged = {**TIGHT, **settings}
    backward = {**TIGHT_BACKWARD, **merged.pop("backward", {})}
    return fixed_point(f, x0, *args, backward=backward, **merged)


def assert_trace_agrees(f, x0, args, wrt, *, atol_x: float, atol_g: float, loss=lambda x: x.sin().sum(),
                        create_graph: bool = False, **settings):
    """``fpidsl.fixed_point(f, x0, *args)`` with the trace on and with it off give the same fixed point (to
    ``atol_x``) and the same gradients of ``loss`` in ``wrt`` (to ``atol_g``); returns both paths' gradients."""
    import fpidsl  # fpidsl.fixed_point: the runtime's, with the trace front-end registered

    results = []
    for trace in (True, False):
        x = fpidsl.fixed_point(f, x0, *args, trace=trace, **settings)
        results.append((x, torch.autograd.grad(loss(x), wrt, create_graph=create_graph)))
    (x_on, g_on), (x_off, g_off) = results
    torch.testing.assert_close(x_on, x_off, rtol=0, atol=atol_x)
    for a, b in zip(g_on, g_off):
        torch.testing.assert_close(a, b, rtol=0, atol=atol_g)
    return g_on, g_off
