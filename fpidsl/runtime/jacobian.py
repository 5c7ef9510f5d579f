"""Jacobian regularisation of a fixed point (Bai, Koltun and Kolter 2021): ``|df/dx|_F^2`` at ``x*``, estimated.

The Hutchinson estimate: for ``v ~ N(0, I)``, ``E |v^T J|^2 = trace(J J^T) = |J|_F^2``, so the mean of ``|v^T J|^2``
over ``samples`` draws is an unbiased estimate whose variance falls like ``1 / samples``. ``J`` is per sample (the
map treats samples independently), and so is the estimate: ``reduction="none"`` returns one per sample, ``"mean"``
(the default) their mean and ``"sum"`` their sum (on an empty batch: nothing, 0, and torch's nan for the mean).
(torchdeq's ``jac_reg`` divides the sum by the batch size times the state size; multiply accordingly to match it.)

The result is differentiable: ``v^T J`` is computed with the adjoint's ``vjp_state`` (the compiled backward map,
or autograd) recording a graph, at the fixed point as the solve returned it, so a loss ``L + gamma * penalty``
trains the parameters towards a better-conditioned fixed point (its gradient includes the dependence of ``x*`` on
them, by the implicit backward).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .adjoint import AutogradAdjoint

REDUCTIONS = ("mean", "sum", "none")


def _rows(t: Tensor, per_sample: bool) -> Tensor:
    """``t`` as (rows, values); explicit sizes, since ``-1`` cannot be inferred for an empty batch."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])) if per_sample else t.reshape(1, t.numel())


def jacobian_penalty(
    f: Callable | None, x_hat: Tensor | Sequence[Tensor], *args: Any, samples: int = 1, adjoint: Any = None,
    reduction: str = "mean", generator: torch.Generator | None = None, per_sample: bool = True,
) -> Tensor:
    """The Hutchinson estimate of ``|df/dx|_F^2`` at ``x_hat`` (see the module's doc).

    Args:
        f: the map, ``f(x, *args)`` as for :func:`~fpidsl.runtime.fixed_point` (ignored when ``adjoint`` is given).
        x_hat: the fixed point (a tensor or a tuple of states), as the solve returned it (attached, for its
            gradient to reach the parameters through it).
        samples: how many random vectors (``>= 1``).
        adjoint: an adjoint object (``prepare`` / ``vjp_state``) of ``f``, e.g. a compiled layer's; its products
            must be differentiable (the compiled ones are).
        generator: the random generator of the vectors (a fixed seed gives a deterministic function).
        per_sample: ``False`` treats the whole state as one sample (no batch dimension).
    """
    if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1):
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    states = (x_hat,) if isinstance(x_hat, Tensor) else tuple(x_hat)
    if adjoint is None:
        if f is None:
            raise ValueError("jacobian_penalty needs the map f or its adjoint")
        adjoint = AutogradAdjoint(f, tuple_states=not isinstance(x_hat, Tensor))
    with torch.enable_grad():
        saved = tuple(adjoint.prepare(states, tuple(args)))
        total = None
        for _ in range(samples):
            v = tuple(torch.randn(s.shape, dtype=s.dtype, device=s.device, generator=generator) for s in states)
            vJ = adjoint.vjp_state(saved, v)
            square = sum(_rows(p, per_sample).pow(2).sum(dim=1) for p in vJ)
            total = square if total is None else total + square
    estimate = total / samples
    if reduction == "mean":
        return estimate.mean()
    if reduction == "sum":
        return estimate.sum()
    return estimate


class LastCall:
    """What a layer's last forward returned (the attached fixed point and the arguments), for
    :func:`jacobian_penalty` after it. Copies and pickles of it are empty: it refers to a live autograd graph."""

    def __init__(self, states: tuple[Tensor, ...] | None = None, values: tuple | None = None):
        self.states, self.values = states, values

    def __deepcopy__(self, memo) -> "LastCall":
        return LastCall()

    def __getstate__(self) -> dict:
        return {"states": None, "values": None}

    def __setstate__(self, state: dict) -> None:
        self.states, self.values = None, None
