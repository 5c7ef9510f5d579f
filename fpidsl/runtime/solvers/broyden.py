"""Broyden's method ("good" Broyden, limited memory), per sample, for the root of ``F(x) = g(x) - x``.

Each sample keeps its own approximation of the inverse Jacobian of ``F``, ``H = -I + sum_i u_i v_i^T`` (the
start ``-I`` makes the first step the Picard step ``x + F(x) = g(x)``), and steps to ``x_{n+1} = x_n - H F(x_n)``.
After a step, with ``dx = x_{n+1} - x_n`` and ``dF = F(x_{n+1}) - F(x_n)``, the Sherman-Morrison form of
Broyden's rank-one update of the Jacobian adds

    v = H^T dx,    u = (dx - H dF) / (v . dF),

so that the new ``H`` maps ``dF`` to ``dx`` (the secant condition). This is torchdeq's and locuslab/deq's solver
without line search. On an affine map with full memory (``m`` at least twice the dimension) it finds the fixed
point in at most ``2 dim`` steps (Gay's theorem).

Implementation notes:

- the updates are held in compact form: ``u`` and the steps ``s = dx`` in buffers of shape ``(batch, m, dim)``
  allocated once, and ``v_i = sum_{j<=i} R_ij s_j`` through a lower-triangular ``R`` of shape ``(batch, m, m)``
  (``v = H^T dx = -dx + sum_i (u_i . dx) v_i`` gives its rows), so every product with a ``v_i`` is a product with
  the steps and a small one with ``R``, and a step reads each of the two histories once (storing ``v`` instead
  needs four reads: ``v`` is built from the ``v_i``). When ``m`` updates are held, the approximation restarts from
  ``-I`` (limited memory). Overwriting only the oldest update instead (torchdeq's
  ``LBFGS_thres``) leaves the later updates, each built on it, inconsistent: on the hard linear map (dimension
  128, ``benchmarks/toolkit.py --only memory``) torchdeq 0.1.0 returns NaN with ``LBFGS_thres`` 30 or 100, while
  restarts converge (m=100: 777 iterations; m=300: 183). Products with the buffers are batched
  row-times-buffer GEMMs;
- a sample whose update is not finite (``v . dF = 0``: the secant step gave no information) keeps its ``H`` (its
  slot is written with zeros), and a sample whose proposed step is not finite takes the Picard step ``g(x)``;
  no sample's failure touches another sample;
- on the CPU a step is one call of a native kernel (:mod:`fpidsl.runtime.native`, the same arithmetic in two
  passes, one over each history) where it is built and takes the tensors; the tensor code below is the step everywhere
  else (GPU, torch.func transforms, torch.compile, other dtypes, ``FPIDSL_NATIVE=0``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .. import native
from .history import keep_rows


@dataclass
class BroydenState:
    """Per-sample rank-one updates in compact form (ring buffers) and the previous iterate and residual.

    ``v_i`` is not stored: it is ``sum_{j<=i} R_ij s_j`` over the stored steps ``s_j`` (``R`` lower triangular,
    ``R_ii = -1``), so a step reads the history twice (``S`` once, ``U`` once) instead of four times."""

    U: Tensor  # (batch, m, dim): u_i
    S: Tensor  # (batch, m, dim): the steps s_i = dx
    R: Tensor  # (batch, m, m): v_i = sum_j R_ij s_j; each row written whole (zeros above the diagonal)
    x_prev: Tensor | None = None  # (batch, dim): the previous iterate (held by reference: nothing writes it)
    f_prev: Tensor | None = None  # (batch, dim): its residual (held likewise)
    filled: int = 0  # slots holding an update (the same for every running sample)
    slot: int = 0  # the slot the next update goes to (== filled; kept for symmetry with Anderson's ring)
    kernel: object = None  # the native library where its kernel takes this solve's buffers (fpidsl.runtime.native)
    held_native: bool = False  # whether the kernel can take x_prev and f_prev (checked when they were new)
    minus_identity: Tensor | None = None  # (m, m): -I, whose row k ends a new row of R in the tensor code


def _rows_times(rows: Tensor, buffer: Tensor) -> Tensor:
    """``rows @ buffer^T`` per sample: ``(batch, r, k)`` with entry ``(r, i)`` the product ``row_r . buffer_i``."""
    return torch.bmm(rows, buffer.transpose(1, 2))


class Broyden:
    """Limited-memory Broyden with ``m`` rank-one updates of the inverse Jacobian."""

    def __init__(self, m: int = 50):
        self.m = m

    def init(self, x: Tensor) -> BroydenState:
        batch, dim = x.shape
        # only the filled slots (and rows of R) are ever read, each written whole before it is read
        state = BroydenState(U=x.new_empty(batch, self.m, dim), S=x.new_empty(batch, self.m, dim),
                             R=x.new_empty(batch, self.m, self.m),
                             minus_identity=-torch.eye(self.m, dtype=x.dtype, device=x.device))
        state.kernel = native.kernel_for(x, state.U, state.S, state.R)
        return state

    def step(self, x: Tensor, g: Tensor, state: BroydenState, f: Tensor | None = None
             ) -> tuple[Tensor, BroydenState]:
        """The next iterate; ``f = g - x`` when the caller has it already. No value leaves the device."""
        if f is None:
            f = g - x
        fits = native.takes(state.kernel, x, g, f)
        if state.x_prev is None:  # the first step: H = -I, no update, the Picard step x + f
            proposal = x + f
        else:
            if state.filled == self.m:  # memory full: restart from H = -I (dropping only the oldest update would
                state.filled = state.slot = 0  # leave the later ones built on it inconsistent, and diverges)
            if fits and state.held_native:
                return self._native_step(x, g, f, state), state
            proposal = self._update(x, f, state)
        state.x_prev, state.f_prev, state.held_native = x, f, fits
        finite = torch.isfinite(proposal).all(dim=1, keepdim=True)
        return torch.where(finite, proposal, g), state

    def _native_step(self, x: Tensor, g: Tensor, f: Tensor, state: BroydenState) -> Tensor:
        """:meth:`step` with an update in one call of the native kernel (the arithmetic of :meth:`_update`)."""
        out = torch.empty_like(x)
        native.broyden_step(state.kernel, state.filled, x, g, f, state.x_prev, state.f_prev, state.U, state.S,
                            state.R, out)
        state.slot = state.filled = state.filled + 1
        state.x_prev, state.f_prev = x, f
        return out

    @staticmethod
    def _update(x: Tensor, f: Tensor, state: BroydenState) -> Tensor:
        """Add the rank-one update of the step ``dx = x - x_prev`` (residual change ``df``) in slot ``filled``
        (``< m``: the caller restarts a full memory), and return the proposal ``x - H f`` with it:

            v = H^T dx = -dx + sum_i (u_i . dx) v_i,    u = (dx + df - sum_i (v_i . df) u_i) / (v . df),

        where ``v_i . y = sum_j R_ij (s_j . y)``, and ``v``'s row of ``R`` is ``R_kj = sum_i (u_i . dx) R_ij``
        (``j < k``), ``R_kk = -1``."""
        k, m = state.filled, state.R.shape[-1]
        dx, df = x - state.x_prev, f - state.f_prev
        both = torch.stack((df, f), dim=1)  # (batch, 2, dim)
        dx_dot = _rows_times(dx.unsqueeze(1), both).squeeze(1)  # (batch, 2): dx . df, dx . f
        diagonal = state.minus_identity[k, k:].expand(dx.shape[0], m - k)  # R_kk = -1, zeros after it
        if k:
            U, Rk = state.U[:, :k], state.R[:, :k, :k]
            sy = _rows_times(both, state.S[:, :k])  # (batch, 2, k): s_j . df, s_j . f
            coefficients = _rows_times(sy, Rk)  # (batch, 2, k): v_i . df, v_i . f
            r = torch.bmm(_rows_times(dx.unsqueeze(1), U), Rk)  # (batch, 1, k): sum_i (u_i . dx) R_ij
            row = torch.cat((r.squeeze(1), diagonal), dim=1)
            v_dot = torch.bmm(r, sy.transpose(1, 2)).squeeze(1) - dx_dot
            wp = torch.baddbmm(torch.stack((dx + df, x + f), dim=1), coefficients, U, alpha=-1)
        else:
            row, v_dot = diagonal, -dx_dot
            wp = torch.stack((dx + df, x + f), dim=1)
        u = wp[:, 0] / v_dot[:, :1]
        usable = (torch.isfinite(u).all(dim=1) & torch.isfinite(row).all(dim=1)).unsqueeze(1)
        zero = u.new_zeros(())
        torch.where(usable, u, zero, out=state.U[:, k])
        torch.where(usable, dx, zero, out=state.S[:, k])
        torch.where(usable, row, zero, out=state.R[:, k])
        state.slot = state.filled = k + 1
        return wp[:, 1] - torch.where(usable, v_dot[:, 1:], zero) * state.U[:, k]

    def select(self, state: BroydenState, keep: Tensor) -> BroydenState:
        k, held = state.filled, state.x_prev is not None
        return replace(state, U=keep_rows(state.U, keep, k), S=keep_rows(state.S, keep, k),
                       R=keep_rows(state.R, keep, k),
                       x_prev=state.x_prev.index_select(0, keep) if held else None,
                       f_prev=state.f_prev.index_select(0, keep) if held else None)
