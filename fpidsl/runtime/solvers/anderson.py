"""Anderson acceleration (type II, difference form), per sample, that never crashes.

With residuals ``f_n = g(x_n) - x_n`` and the differences of the last ``k <= m`` iterates
``dX_i = x_{i+1} - x_i`` and ``dF_i = f_{i+1} - f_i``, each sample solves the small regularised least-squares
problem ``min_gamma |f_n - dF gamma|^2 + reg |gamma|^2`` and steps to

    x_{n+1} = x_n + beta f_n - (dX + beta dF) gamma.

Implementation notes:

- history buffers of shape ``(batch, m, dim)`` are allocated once and written in place, in a ring: ``dF`` and
  ``dH = dX + beta dF`` (the only form in which ``dX`` is used), so a step reads each buffer once: one batched
  product gives both the new Gram column ``dF dF_new`` and the right-hand side ``dF f_n``, one the correction
  ``dH gamma``;
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
        # one pass over dF: the Gram column of the newest difference and the right-hand side dF f
        rows = f.unsqueeze(-1) if newest is None else torch.stack((state.dF[:, newest], f), dim=-1)
        products = torch.bmm(state.dF[:, :k], rows)  # (batch, k, 1 or 2)
        if newest is not None:
            state.gram[:, newest, :k] = products[..., 0]
            state.gram[:, :k, newest] = products[..., 0]
        gamma = self._mix_coefficients(f, products[..., -1:], state)
        correction = torch.bmm(gamma.unsqueeze(1), state.dH[:, :k]).squeeze(1)
        return plain - correction, state

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
        scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)
        reg = self.lam * scale + torch.finfo(f.dtype).tiny
        eye = torch.eye(k, dtype=f.dtype, device=f.device)
        gamma, info = torch.linalg.solve_ex(gram + reg[:, None, None] * eye, rhs)
        f2 = (f * f).sum(-1)
        predicted = f2 - 2 * (gamma * rhs).sum((-1, -2)) + (gamma * torch.bmm(gram, gamma)).sum((-1, -2))
        finite = gamma.abs().amax((-2, -1)) < math.inf
        good = (info == 0) & finite & (predicted <= PREDICTION_SLACK * f2)
        return torch.where(good[:, None], gamma.squeeze(-1), torch.zeros_like(gamma.squeeze(-1)))
