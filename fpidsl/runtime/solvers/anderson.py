"""Anderson acceleration (type II, difference form), per sample, that never crashes.

With residuals ``f_n = g(x_n) - x_n`` and the differences of the last ``k <= m`` iterates
``dX_i = x_{i+1} - x_i`` and ``dF_i = f_{i+1} - f_i``, each sample solves the small regularised least-squares
problem ``min_gamma |f_n - dF gamma|^2 + reg |gamma|^2`` and steps to

    x_{n+1} = x_n + beta f_n - (dX + beta dF) gamma.

Implementation notes:

- history buffers of shape ``(batch, m, dim)`` are allocated once and written in place, in a ring: ``dF`` and
  ``dH = dX + beta dF`` (the only form in which ``dX`` is used), written as the difference of two plain steps
  ``p = x + beta f`` (one pass over the state, not two; the plain step is computed anyway); the previous plain
  step and residual are held by reference, not copied (nothing writes them); the products with them are written as
  ``(batch, 1, dim) @ (batch, dim, k)`` (``bmm`` of a row with the transposed buffer: 0.013 ms against 0.15 ms
  for ``buffer @ column`` on CPU at batch 8, dim 4096, m 6, ``benchmarks/kernels.py``) and the correction is
  fused into the step (``baddbmm``);
- the Gram matrix ``dF dF^T`` is kept up to date one row and column at a time (``O(m dim)`` a step, not
  ``O(m^2 dim)``); the ``k x k`` systems of all samples are solved in one batched ``solve_ex`` call, and the
  checks of its solution stay on the device: a step never waits for the host (the driver asks it one question per
  check interval, ``check_every`` iterations, :mod:`fpidsl.runtime.driver`);
- ``reg = lam * mean(diag(Gram))`` keeps the regularisation independent of the scale of the problem;
- a sample whose system is singular (``info != 0``), whose solution is not finite, or whose mix would predict a
  larger residual than the plain step (the sign of an ill-conditioned solve) takes the plain step
  ``x_n + beta f_n`` instead; no sample's failure touches another sample;
- on the CPU the step after the plain step's computation is one call of a native kernel
  (:mod:`fpidsl.runtime.native`, the same arithmetic, 45 aten operations an iteration fewer) where it
  is built and takes the tensors; the tensor code below is the step everywhere else (GPU, torch.func transforms,
  torch.compile, other dtypes, ``FPIDSL_NATIVE=0``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import native
from .history import keep_rows

# A mix is rejected when it predicts a residual larger than the plain step's by more than this factor.
PREDICTION_SLACK = 1.01


@dataclass
class AndersonState:
    """Per-sample history (ring buffers) and the Gram matrix of the residual differences."""

    dH: Tensor  # (batch, m, dim): dX + beta dF
    dF: Tensor  # (batch, m, dim)
    gram: Tensor  # (batch, m, m)
    p_prev: Tensor | None = None  # (batch, dim): the previous plain step x + beta f (held, never written)
    f_prev: Tensor | None = None  # (batch, dim): the previous residual (held, never written)
    filled: int = 0  # how many ring slots hold differences (the same for every running sample)
    slot: int = 0  # the slot the next difference goes to
    kernel: object = None  # the native library where its kernel takes this solve's buffers (fpidsl.runtime.native)
    held_native: bool = False  # whether the kernel can take p_prev and f_prev (checked when they were new)
    # the tensor code's constants, made at its first step: the regularisation's identity (m, m); the dtype's
    # smallest normal number, which keeps an all-zero system regular, and zero (the coefficients of a rejected
    # mix), both 0-dimensional
    eye: Tensor | None = None
    tiny: Tensor | None = None
    zero: Tensor | None = None


class Anderson:
    """Anderson acceleration with memory ``m``, mixing ``beta`` and relative regularisation ``lam``."""

    def __init__(self, m: int = 5, beta: float = 1.0, lam: float = 1e-4):
        self.m = m
        self.beta = beta
        self.lam = lam

    def init(self, x: Tensor) -> AndersonState:
        batch, dim = x.shape
        # only the filled slots (and their Gram block) are ever read, each written before it is read
        state = AndersonState(dH=x.new_empty(batch, self.m, dim), dF=x.new_empty(batch, self.m, dim),
                              gram=x.new_zeros(batch, self.m, self.m))
        kernel = native.kernel_for(x, state.dH, state.dF, state.gram)  # None where the kernels cannot take these
        state.kernel = kernel if kernel is not None and self.m <= native.max_m() else None
        return state

    def step(self, x: Tensor, g: Tensor, state: AndersonState, f: Tensor | None = None
             ) -> tuple[Tensor, AndersonState]:
        """The next iterate; ``f = g - x`` when the caller has it already."""
        if f is None:
            f = g - x
        plain = x + self.beta * f if self.beta != 1.0 else g
        fits = native.takes(state.kernel, plain, f)
        if state.f_prev is None:
            state.p_prev, state.f_prev, state.held_native = plain, f, fits
            return plain, state
        if fits and state.held_native:
            return self._native_step(plain, f, state), state
        state.held_native = fits
        if state.eye is None:
            state.eye = torch.eye(self.m, dtype=x.dtype, device=x.device)
            state.tiny = torch.tensor(torch.finfo(x.dtype).tiny, dtype=x.dtype, device=x.device)
            state.zero = x.new_zeros(())
        s = self._push(plain, f, state)
        k = state.filled
        history = state.dF[:, :k].transpose(1, 2)  # (batch, dim, k): v (batch, 1, dim) @ it is one fast GEMM
        column = torch.bmm(state.dF[:, s:s + 1], history)  # the new Gram row, (batch, 1, k)
        state.gram[:, s:s + 1, :k] = column
        state.gram[:, :k, s:s + 1] = column.transpose(1, 2)
        rhs = torch.bmm(f.unsqueeze(1), history).transpose(1, 2)  # dF f, (batch, k, 1)
        gamma = self._mix_coefficients(f, rhs, state)
        return torch.baddbmm(plain.unsqueeze(1), gamma, state.dH[:, :k], alpha=-1).squeeze(1), state

    def select(self, state: AndersonState, keep: Tensor) -> AndersonState:
        return AndersonState(
            dH=keep_rows(state.dH, keep, state.filled),
            dF=keep_rows(state.dF, keep, state.filled),
            gram=state.gram.index_select(0, keep),
            eye=state.eye,
            tiny=state.tiny,
            zero=state.zero,
            p_prev=None if state.p_prev is None else state.p_prev.index_select(0, keep),
            f_prev=None if state.f_prev is None else state.f_prev.index_select(0, keep),
            filled=state.filled,
            slot=state.slot,
            kernel=state.kernel,
            held_native=state.held_native,
        )

    def _native_step(self, plain: Tensor, f: Tensor, state: AndersonState) -> Tensor:
        """The step of :meth:`step` after the plain step, in one call of the native kernel (which writes the ring
        slot and the Gram row and column like :meth:`_push` and the caller, and mixes like
        :meth:`_mix_coefficients`)."""
        out = torch.empty_like(plain)
        native.anderson_step(state.kernel, min(state.filled + 1, self.m), state.slot, self.lam,
                             torch.finfo(plain.dtype).tiny, PREDICTION_SLACK, plain, f, state.p_prev, state.f_prev,
                             state.dH, state.dF, state.gram, out)
        self._advance(plain, f, state)
        return out

    def _push(self, plain: Tensor, f: Tensor, state: AndersonState) -> int:
        """Write the newest differences into the ring (``dH = dX + beta dF``, the difference of the plain steps)
        and hold ``plain`` and ``f`` as the previous ones; returns the slot (its Gram row is refreshed by the
        caller)."""
        s = state.slot
        torch.sub(f, state.f_prev, out=state.dF[:, s])
        torch.sub(plain, state.p_prev, out=state.dH[:, s])
        self._advance(plain, f, state)
        return s

    def _advance(self, plain: Tensor, f: Tensor, state: AndersonState) -> None:
        """Hold ``plain`` and ``f`` as the previous ones and move the ring on by the slot just written."""
        state.p_prev, state.f_prev = plain, f
        state.slot = (state.slot + 1) % self.m
        state.filled = min(state.filled + 1, self.m)

    def _mix_coefficients(self, f: Tensor, rhs: Tensor, state: AndersonState) -> Tensor:
        """gamma per sample as a row, ``(batch, 1, k)`` (``rhs = dF f``, ``(batch, k, 1)``), zero (the plain step)
        where the least-squares solve failed or is not trustworthy. No value leaves the device."""
        k = state.filled
        gram = state.gram[:, :k, :k]
        diagonal = gram.diagonal(dim1=-2, dim2=-1).unsqueeze(1)  # (batch, 1, k)
        reg = diagonal.mean(-1, keepdim=True).mul_(self.lam).add_(state.tiny)  # (batch, 1, 1)
        system = torch.addcmul(gram, state.eye[:k, :k], reg)
        gamma, info = torch.linalg.solve_ex(system, rhs)
        # |f - dF gamma|^2 - |f|^2 = gamma . (G gamma - 2 dF f); not finite where gamma is not
        change = torch.bmm(gamma.transpose(1, 2), torch.baddbmm(rhs, gram, gamma, beta=-2))  # (batch, 1, 1)
        f2 = torch.linalg.vecdot(f, f).view(-1, 1, 1)
        good = (info.view(-1, 1, 1) == 0) & (change.abs() < math.inf) & (f2 + change <= PREDICTION_SLACK * f2)
        return torch.where(good, gamma.transpose(1, 2), state.zero)
