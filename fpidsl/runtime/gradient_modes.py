"""The gradient modes other than the exact implicit one (``backward { mode = ... }``).

With ``x* = f(x*, theta)`` the fixed point and ``gbar = dL/dx*``:

- ``implicit`` (the default, :mod:`fpidsl.runtime.fixed_point`): ``dL/dtheta = (df/dtheta)^T c`` with ``c`` the
  adjoint fixed point ``c = J^T c + gbar``, ``J = df/dx`` at ``x*``. Exact, to every order.
- ``jfb`` (Jacobian-free backprop, Fung et al. 2022): ``c = gbar``, the gradient of one step ``f(x*, theta)``
  with ``x*`` held fixed. One vector-Jacobian product; a descent direction when ``f`` is contractive enough, not
  the gradient.
- ``phantom(k, tau)`` (Geng et al. 2021, torchdeq's ``grad=k``): the gradient of ``z_k`` for the ``k`` damped steps
  ``z_{j+1} = (1 - tau) z_j + tau f(z_j, theta)`` from ``z_0 = x*`` (held fixed), exactly as autograd through those
  steps gives it, but by the compiled adjoint's products (``k`` of them) and without keeping the ``k`` graphs.
  ``phantom(k=1, tau=1)`` is ``jfb``; as ``k`` grows with ``tau = 1`` it tends to the implicit gradient when the
  iteration contracts. The layer's output stays ``x*`` (torchdeq returns ``z_k``, which differs from ``x*`` by
  the solve's residual).
- ``unrolled(k)`` (pretraining, locuslab/deq's ``pretrain_steps``): no solver at all; the output is ``k`` steps
  ``x <- (1 - beta) x + beta f(x)`` from the start (``beta`` the solve's), recorded by autograd, so the gradient is
  plain backpropagation through them (exact for that output, to every order; memory grows with ``k``).
  ``k`` defaults to the solve's ``max_iter``. The stats record ``k`` iterations and the last step's residual;
  ``on_fail`` is not applied (a pretraining iterate is not expected to have converged). Unlike the other modes,
  the output depends on the start, and its gradient reaches it.

A higher derivative through ``jfb`` or ``phantom`` (reverse over reverse, or forward AD over the backward)
differentiates the surrogate's formula (with ``x*`` the differentiable output of the solve); only ``implicit``
and ``unrolled`` are exact derivatives of their output.
The surrogates are reverse-mode only: forward-mode derivatives (``torch.func.jvp``) of a fixed point are the
implicit ones whatever the mode.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .adjoint import AutogradAdjoint, _Bound, detached, linearized, vjp_args
from .layout import States
from .settings import JacobianFreeGradient, PhantomGradient, UnrolledGradient
from .stats import SolveStats

INEXACT_MODES = ("jfb", "phantom")


def _damped(z: States, fz: States, tau: float) -> States:
    if tau == 1.0:
        return tuple(fz)
    return tuple(zi + tau * (fi - zi) for zi, fi in zip(z, fz))


def _add(total: list, grads: Sequence[Tensor | None], scale: float) -> None:
    for i, g in enumerate(grads):
        if g is None:
            continue
        g = g if scale == 1.0 else scale * g
        total[i] = g if total[i] is None else total[i] + g


def inexact_backprop(problem, x_hat: States, args: tuple, gbar: States, needs: Sequence[bool]) -> tuple:
    """``dL/dargs`` by the ``jfb`` or ``phantom`` mode of ``problem.backward`` (see the module's doc)."""
    mode = problem.backward.gradient
    if isinstance(mode, JacobianFreeGradient):
        k, tau = 1, 1.0
    elif isinstance(mode, PhantomGradient):
        k, tau = mode.k, mode.tau
    else:  # pragma: no cover - the caller dispatches only these
        raise ValueError(f"not an inexact gradient mode: {mode!r}")
    adjoint = problem.adjoint
    create = torch.is_grad_enabled()
    if not create and isinstance(adjoint, AutogradAdjoint):
        return _by_autograd(problem, x_hat, args, gbar, needs, k, tau)
    points = [tuple(x_hat)]
    for _ in range(k - 1):
        points.append(_damped(points[-1], problem.fn(points[-1], *args), tau))
    a = tuple(gbar)
    total: list[Tensor | None] = [None] * len(args)
    for j in reversed(range(k)):
        saved = tuple(adjoint.prepare(points[j], args))
        if create:  # differentiable products: a higher derivative differentiates this formula
            _add(total, vjp_args(adjoint, saved, a, needs), tau)
            back = adjoint.vjp_state(saved, a) if j else None
        else:
            lin = linearized(adjoint, saved)
            _add(total, lin.vjp_args(a, needs) if isinstance(lin, _Bound) else lin.vjp_args(a), tau)
            back = lin.vjp_state(a) if j else None
        if j:
            a = _damped(a, tuple(back), tau)
    if len(total) != len(args):
        raise ValueError(f"{adjoint!r}.vjp_args returned {len(total)} gradients for {len(args)} arguments")
    return tuple(g if need else None for g, need in zip(total, needs))


def _by_autograd(problem, x_hat: States, args: tuple, gbar: States, needs: Sequence[bool], k: int,
                 tau: float) -> tuple:
    """The same gradient for a map without a compiled adjoint: the ``k`` steps recorded once, one backward pass
    (what torchdeq does; cheaper than ``k`` separate linearisations)."""
    wanted = [i for i, (a, need) in enumerate(zip(args, needs))
              if need and isinstance(a, Tensor) and a.is_floating_point()]
    with torch.enable_grad():
        leaves = list(args)
        for i in wanted:  # detached keeps a forward-mode tangent: forward AD over this backward differentiates it
            leaves[i] = detached(args[i]).requires_grad_()
        z = tuple(detached(x) for x in x_hat)
        for _ in range(k):
            z = _damped(z, problem.fn(z, *leaves), tau)
        pairs = [(zi, gi) for zi, gi in zip(z, gbar) if zi.requires_grad]
        if not pairs or not wanted:
            return (None,) * len(args)
        grads = torch.autograd.grad([p[0] for p in pairs], [leaves[i] for i in wanted], [p[1] for p in pairs],
                                    allow_unused=True)
    out: list[Tensor | None] = [None] * len(args)
    for i, g in zip(wanted, grads):
        out[i] = g
    return tuple(out)


def unrolled_forward(problem, x0: States, args: Sequence[Any]) -> States:
    """The ``unrolled(k)`` mode's output: ``k`` damped Picard steps from ``x0``, recorded by autograd."""
    mode = problem.backward.gradient
    assert isinstance(mode, UnrolledGradient)
    settings = problem.forward
    k = mode.k if mode.k is not None else settings.max_iter
    beta = settings.beta
    z = tuple(x0)
    layout = problem.layout
    last = None
    for _ in range(k):
        fz = problem.fn(z, *args)
        last = (z, fz)
        z = _damped(z, fz, beta)
    with torch.no_grad():
        x, g = (layout.flatten(tuple(t.detach() for t in s)) for s in last)
        step = torch.linalg.vector_norm(g - x, dim=1)
        norm = torch.linalg.vector_norm(x, dim=1)
        residual = step if settings.criterion == "absolute" else (step / norm).masked_fill_(step == 0, 0.0)
        finite = torch.isfinite(residual)
        rows = residual.shape[0]
        problem.stats.forward = SolveStats(
            problem.phase, settings, torch.full((rows,), k, dtype=torch.long, device=residual.device), residual,
            finite & (residual < settings.tol), ~finite, torch.zeros_like(finite))
    return z
