"""Restarted GMRES(m), per sample, for the fixed point of an affine map ``T(c) = L c + b``: the linear system
``(I - L) c = b``.

The backward's adjoint map ``T(c) = J^T c + gbar`` is affine, so its fixed point is a linear solve; GMRES converges
where the fixed-point iteration is slow or diverges (spectral radius of ``J`` at or above 1), as long as ``I - J``
is non-singular. Only evaluations of ``T`` are needed: ``b = T(0)`` once, and ``L v = (T(s v) - b) / s`` for a
Krylov vector ``v`` (``s`` = the sample's ``|b|``, so the difference loses no more than rounding relative to
``b``). Every sample has its own Krylov space (inner products and norms run over one row): a sample's result does
not depend on the rest of the batch.

One cycle: from the residual ``r = T(c) - c`` (the fixed-point residual is the linear system's residual), up to
``m`` Arnoldi steps (classical Gram-Schmidt applied twice, batched as GEMMs) with Givens rotations, whose running
estimate of ``|r|`` ends the cycle once every running sample's estimate is below its threshold; then the
least-squares update and the true residual, one more evaluation, which decides convergence. ``max_iter`` bounds
the evaluations of ``T`` (each Arnoldi step, each true residual and ``T(0)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class GmresResult:
    """Per sample: the solution, the evaluations of ``T`` it took, its last true residual (by ``criterion``), and
    whether it converged, broke down (a residual that is not finite) or stopped at the precision floor."""

    x: Tensor
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    diverged: Tensor
    floor: Tensor
    history: list[Tensor]  # the true residual of every sample at each check (NaN where finished)
    first_step: Tensor  # the absolute residual |T(x0) - x0| at the start (the iteration's first step)


def _norm(v: Tensor) -> Tensor:
    return torch.linalg.vector_norm(v, dim=1)


def _measure(x: Tensor, r: Tensor, relative: bool) -> Tensor:
    step = _norm(r)
    if not relative:
        return step
    return (step / _norm(x)).masked_fill_(step == 0, 0.0)


def gmres(evaluate: Callable[[Tensor], Tensor], restrict: Callable[[Tensor], None], x0: Tensor, *, m: int,
          tol: float, relative: bool, max_iter: int, min_iter: int = 0, floor: float = 0.0) -> GmresResult:
    """Solve ``c = T(c)`` for an affine ``T`` (``evaluate``, rows are samples) from ``x0`` ``(batch, dim)``.

    ``restrict(index)`` tells ``evaluate`` which samples (batch indices, in row order) are still running. A sample
    whose relative residual is at most ``floor`` and no lower than at the previous check (the cycle gained
    nothing: rounding) stops there, as at the iteration's precision floor."""
    batch, dim = x0.shape
    out = x0.clone()
    iterations = torch.zeros(batch, dtype=torch.long, device=x0.device)
    residual = torch.full((batch,), float("nan"), dtype=x0.dtype, device=x0.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=x0.device)
    diverged = torch.zeros_like(converged)
    at_floor = torch.zeros_like(converged)
    history: list[Tensor] = []
    if batch == 0:
        return GmresResult(out, iterations, residual, converged, diverged, at_floor, history, residual.clone())
    index = torch.arange(batch, device=x0.device)
    b = evaluate(torch.zeros_like(x0))
    evals = 1
    scale = _norm(b).unsqueeze(1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = x0.clone()
    r = evaluate(x) - x
    evals += 1
    first_step = _norm(r)
    m = min(m, max(dim, 1))
    previous = torch.full_like(residual, float("inf"))  # the relative residual at the last check, per running row
    while True:
        res = _measure(x, r, relative)
        rel = res if relative else _measure(x, r, True)
        row = torch.full_like(residual, float("nan"))
        row[index] = res
        history.append(row)
        bad = ~torch.isfinite(res)
        started = evals >= min_iter
        good = (res < tol) & ~bad if started else torch.zeros_like(bad)
        stuck = (rel <= floor) & (rel >= previous) & ~good & ~bad if started else torch.zeros_like(bad)
        done = bad | good | stuck
        if evals >= max_iter:
            done = torch.ones_like(done)
        previous = rel
        if bool(done.any()):
            rows = index[done]
            out[rows], residual[rows], iterations[rows] = x[done], res[done], evals
            converged[rows], diverged[rows], at_floor[rows] = good[done], bad[done], stuck[done]
            keep = ~done
            if not bool(keep.any()):
                break
            index, x, r, b, scale = index[keep], x[keep], r[keep], b[keep], scale[keep]
            previous = previous[keep]
            restrict(index)
        threshold = tol * _norm(x) if relative else torch.full_like(x[:, 0], tol)
        x, evals = _cycle(evaluate, x, r, b, scale, m, threshold, evals, max_iter - 1)
        r = evaluate(x) - x
        evals += 1
    return GmresResult(out, iterations, residual, converged, diverged, at_floor, history, first_step)


def _cycle(evaluate, x: Tensor, r: Tensor, b: Tensor, scale: Tensor, m: int, threshold: Tensor, evals: int,
           budget: int) -> tuple[Tensor, int]:
    """One GMRES(m) cycle from ``x`` (residual ``r``); returns the updated ``x`` and the evaluation count."""
    rows, dim = x.shape
    beta = _norm(r)
    V = x.new_zeros(rows, m + 1, dim)
    V[:, 0] = r / torch.where(beta > 0, beta, torch.ones_like(beta)).unsqueeze(1)
    R = x.new_zeros(rows, m, m)
    cs, sn = x.new_zeros(rows, m), x.new_zeros(rows, m)
    g = x.new_zeros(rows, m + 1)
    g[:, 0] = beta
    k = 0
    for j in range(m):
        if evals >= budget:
            break
        v = V[:, j]
        w = v - (evaluate(scale * v) - b) / scale
        evals += 1
        basis = V[:, : j + 1]
        h = torch.bmm(basis, w.unsqueeze(2)).squeeze(2)  # (rows, j+1): classical Gram-Schmidt, twice
        w = w - torch.bmm(h.unsqueeze(1), basis).squeeze(1)
        h2 = torch.bmm(basis, w.unsqueeze(2)).squeeze(2)
        w = w - torch.bmm(h2.unsqueeze(1), basis).squeeze(1)
        h = h + h2
        next_norm = _norm(w)
        V[:, j + 1] = w / torch.where(next_norm > 0, next_norm, torch.ones_like(next_norm)).unsqueeze(1)
        column = torch.cat([h, next_norm.unsqueeze(1)], dim=1)  # (rows, j+2)
        for i in range(j):  # the earlier rotations
            top = cs[:, i] * column[:, i] + sn[:, i] * column[:, i + 1]
            column[:, i + 1] = -sn[:, i] * column[:, i] + cs[:, i] * column[:, i + 1]
            column[:, i] = top
        radius = torch.hypot(column[:, j], column[:, j + 1])
        safe = torch.where(radius > 0, radius, torch.ones_like(radius))
        cs[:, j] = torch.where(radius > 0, column[:, j] / safe, torch.ones_like(radius))
        sn[:, j] = torch.where(radius > 0, column[:, j + 1] / safe, torch.zeros_like(radius))
        column[:, j] = radius
        R[:, : j + 1, j] = column[:, : j + 1]
        g[:, j + 1] = -sn[:, j] * g[:, j]
        g[:, j] = cs[:, j] * g[:, j]
        k = j + 1
        if bool((g[:, j + 1].abs() < threshold).all()):
            break
    if k == 0:
        return x, evals
    upper = R[:, :k, :k]
    diagonal = upper.diagonal(dim1=-2, dim2=-1)
    upper = upper.clone()
    upper.diagonal(dim1=-2, dim2=-1).copy_(torch.where(diagonal != 0, diagonal, torch.ones_like(diagonal)))
    y = torch.linalg.solve_triangular(upper, g[:, :k].unsqueeze(2), upper=True).squeeze(2)
    step = torch.bmm(y.unsqueeze(1), V[:, :k]).squeeze(1)
    finite = torch.isfinite(step).all(dim=1, keepdim=True)
    return torch.where(finite, x + step, x), evals
