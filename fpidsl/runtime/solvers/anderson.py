"""Anderson acceleration (type II, difference form), per sample, that never crashes.

With residuals ``f_n = g(x_n) - x_n`` and the differences of the last ``k <= m`` iterates
``dX_i = x_{i+1} - x_i`` and ``dF_i = f_{i+1} - f_i``, each sample solves the small regularised least-squares
problem ``min_gamma |f_n - dF gamma|^2 + reg |gamma|^2`` and steps to

    x_{n+1} = x_n + beta f_n - (dX + beta dF) gamma.

Implementation notes:

- history buffers of shape ``(batch, m, dim)`` are allocated once and written in place, in a ring: ``dF`` and
  ``dH = dX + beta dF`` (the only form in which ``dX`` is used); the products with them are written as
  ``(batch, 1, dim) @ (batch, dim, k)`` (``bmm`` of a row with the transposed buffer: 0.013 ms against 0.15 ms
  for ``buffer @ column`` on CPU at batch 8, dim 4096, m 6, ``benchmarks/kernels.py``) and the correction is
  fused into the step (``baddbmm``);
- the Gram matrix ``dF dF^T`` is kept up to date one row and column at a time (``O(m dim)`` a step, not
  ``O(m^2 dim)``); the ``k x k`` systems of all samples are solved in one batched ``solve_ex`` call;
- ``reg = lam * mean(diag(Gram))`` keeps the regularisation independent of the scale of the problem;
- a sample whose system is singular (``info != 0``), whose solution is not finite, or whose mix would predict a
  larger residual than the plain step (the sign of an ill-conditioned solve) takes the plain step
  ``x_n + beta f_n`` instead; no sample's failure touches another sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# A mix is rejected when it predicts a residual larger than the plain step's by more than this factor.
PREDICTION_SLACK = 1.01


@dataclass
class AndersonState:
    """Per-sample history (ring buffers) and the Gram matrix of the residual differences."""

    dH: Tensor  # (batch, m, dim): dX + beta dF
    dF: Tensor  # (batch, m, dim)
    gram: Tensor  # (batch, m, m)
    x_prev: Tensor  # (batch, dim)
    f_prev: Tensor  # (batch, dim)
    filled: int = 0  # how many ring slots hold differences (the same for every running sample)
    slot: int = 0  # the slot the next difference goes to
    started: bool = False  # x_prev and f_prev hold the previous iterate


class Anderson:
    """Anderson acceleration with memory ``m``, mixing ``beta`` and relative regularisation ``lam``."""

    def __init__(self, m: int = 5, beta: float = 1.0, lam: float = 1e-4):
        self.m = m
        self.beta = beta
        self.lam = lam

    def init(self, x: Tensor) -> AndersonState:
        batch, dim = x.shape
        return AndersonState(
            dH=x.new_zeros(batch, self.m, dim),
            dF=x.new_zeros(batch, self.m, dim),
            gram=x.new_zeros(batch, self.m, self.m),
            x_prev=torch.empty_like(x),
            f_prev=torch.empty_like(x),
        )

    def step(self, x: Tensor, g: Tensor, state: AndersonState) -> tuple[Tensor, AndersonState]:
        f = g - x
        newest = self._push(x, f, state) if state.started else None
        state.x_prev.copy_(x)
        state.f_prev.copy_(f)
        state.started = True
        plain = x + self.beta * f if self.beta != 1.0 else g
        if state.filled == 0:
            return plain, state
        k = state.filled
        history = state.dF[:, :k].transpose(1, 2)  # (batch, dim, k): v (batch, 1, dim) @ it is one fast GEMM
        if newest is not None:
            column = torch.bmm(state.dF[:, newest].unsqueeze(1), history).squeeze(1)  # the new Gram row/column
            state.gram[:, newest, :k] = column
            state.gram[:, :k, newest] = column
        rhs = torch.bmm(f.unsqueeze(1), history).transpose(1, 2)  # dF f, (batch, k, 1)
        gamma = self._mix_coefficients(f, rhs, state)
        step = torch.baddbmm(plain.unsqueeze(1), gamma.unsqueeze(1), state.dH[:, :k], alpha=-1)
        return step.squeeze(1), state

    def select(self, state: AndersonState, keep: Tensor) -> AndersonState:
        return AndersonState(
            dH=state.dH[keep],
            dF=state.dF[keep],
            gram=state.gram[keep],
            x_prev=state.x_prev[keep],
            f_prev=state.f_prev[keep],
            filled=state.filled,
            slot=state.slot,
            started=state.started,
        )

    def _push(self, x: Tensor, f: Tensor, state: AndersonState) -> int:
        """Write the newest differences into the ring; returns their slot (its Gram row is refreshed by the
        caller)."""
        s = state.slot
        torch.sub(f, state.f_prev, out=state.dF[:, s])
        dH = torch.sub(x, state.x_prev, out=state.dH[:, s])
        if self.beta != 0.0:
            dH.add_(state.dF[:, s], alpha=self.beta)
        state.slot = (s + 1) % self.m
        state.filled = min(state.filled + 1, self.m)
        return s

    def _mix_coefficients(self, f: Tensor, rhs: Tensor, state: AndersonState) -> Tensor:
        """gamma per sample (``rhs = dF f``, ``(batch, k, 1)``), zero (the plain step) where the least-squares
        solve failed or is not trustworthy."""
        k = state.filled
        gram = state.gram[:, :k, :k]
        system = gram.clone()
        diagonal = system.diagonal(dim1=-2, dim2=-1)
        diagonal.add_(diagonal.mean(-1, keepdim=True).mul_(self.lam).add_(torch.finfo(f.dtype).tiny))
        gamma, info = torch.linalg.solve_ex(system, rhs)
        f2 = torch.linalg.vecdot(f, f)
        # |f - dF gamma|^2 - |f|^2 = gamma . (G gamma - 2 dF f); not finite where gamma is not
        change = (gamma * (torch.bmm(gram, gamma) - 2 * rhs)).sum((-1, -2))
        good = (info == 0) & (change.abs() < math.inf) & (f2 + change <= PREDICTION_SLACK * f2)
        return torch.where(good[:, None], gamma.squeeze(-1), 0.0)
