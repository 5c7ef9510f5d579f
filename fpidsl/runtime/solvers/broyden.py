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

- ``u`` and ``v`` live in buffers of shape ``(batch, m, dim)`` allocated once; when ``m`` updates are held, the
  approximation restarts from ``-I`` (limited memory). Overwriting only the oldest update instead (torchdeq's
  ``LBFGS_thres``) leaves the later updates, each built on it, inconsistent: on the hard linear map (dimension
  128, ``benchmarks/toolkit.py --only memory``) torchdeq 0.1.0 returns NaN with ``LBFGS_thres`` 30 or 100, while
  restarts converge (m=100: 682 iterations; m=300: 183). Products with the buffers are batched
  row-times-buffer GEMMs;
- a sample whose update is not finite (``v . dF = 0``: the secant step gave no information) keeps its ``H`` (its
  slot is written with zeros), and a sample whose proposed step is not finite takes the Picard step ``g(x)``;
  no sample's failure touches another sample;
- on the CPU a step is one call of a native kernel (:mod:`fpidsl.runtime.native`, the same arithmetic in two
  passes over the buffers) where it is built and takes the tensors; the tensor code below is the step everywhere
  else (GPU, torch.func transforms, torch.compile, other dtypes, ``FPIDSL_NATIVE=0``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import native
from .history import keep_rows


@dataclass
class BroydenState:
    """Per-sample rank-one updates (ring buffers) and the previous iterate and residual."""

    U: Tensor  # (batch, m, dim)
    V: Tensor  # (batch, m, dim)
    x_prev: Tensor | None = None  # (batch, dim): the previous iterate (held by reference: nothing writes it)
    f_prev: Tensor | None = None  # (batch, dim): its residual (held likewise)
    filled: int = 0  # slots holding an update (the same for every running sample)
    slot: int = 0  # the slot the next update goes to (== filled; kept for symmetry with Anderson's ring)
    kernel: object = None  # the native library where its kernel takes this solve's buffers (fpidsl.runtime.native)
    held_native: bool = False  # whether the kernel can take x_prev and f_prev (checked when they were new)


def _rows_times(y: Tensor, buffer: Tensor) -> Tensor:
    """``buffer @ y`` per sample as a row: ``(batch, 1, k)`` with entry ``i`` the product ``buffer_i . y``."""
    return torch.bmm(y.unsqueeze(1), buffer.transpose(1, 2))


class Broyden:
    """Limited-memory Broyden with ``m`` rank-one updates of the inverse Jacobian."""

    def __init__(self, m: int = 50):
        self.m = m

    def init(self, x: Tensor) -> BroydenState:
        batch, dim = x.shape
        # only the filled slots are ever read, each written before it is read
        state = BroydenState(U=x.new_empty(batch, self.m, dim), V=x.new_empty(batch, self.m, dim))
        state.kernel = native.kernel_for(x, state.U, state.V)
        return state

    @staticmethod
    def _apply(state: BroydenState, y: Tensor, transpose: bool) -> Tensor:
        """``H y`` (or ``H^T y``) with ``H = -I + U^T V`` over the filled slots."""
        k = state.filled
        if k == 0:
            return -y
        first, second = (state.U, state.V) if transpose else (state.V, state.U)
        coefficients = _rows_times(y, first[:, :k])  # (batch, 1, k)
        return torch.baddbmm(-y.unsqueeze(1), coefficients, second[:, :k]).squeeze(1)

    def step(self, x: Tensor, g: Tensor, state: BroydenState, f: Tensor | None = None
             ) -> tuple[Tensor, BroydenState]:
        """The next iterate; ``f = g - x`` when the caller has it already. No value leaves the device."""
        if f is None:
            f = g - x
        fits = native.takes(state.kernel, x, g, f)
        update = state.x_prev is not None
        if update and state.filled == self.m:  # memory full: restart from H = -I (dropping only the oldest update
            state.filled = state.slot = 0  # would leave the later ones built on it inconsistent, and diverges)
        if fits and (state.held_native or not update):
            return self._native_step(x, g, f, state, update), state
        state.held_native = fits
        if update:
            self._update(x - state.x_prev, f - state.f_prev, state)
        state.x_prev, state.f_prev = x, f
        proposal = x - self._apply(state, f, transpose=False)
        finite = torch.isfinite(proposal).all(dim=1, keepdim=True)
        return torch.where(finite, proposal, g), state

    def _native_step(self, x: Tensor, g: Tensor, f: Tensor, state: BroydenState, update: bool) -> Tensor:
        """:meth:`step` in one call of the native kernel (the update like :meth:`_update`, then the proposal)."""
        out = torch.empty_like(x)
        native.broyden_step(state.kernel, state.filled, update, x, g, f, state.x_prev, state.f_prev, state.U,
                            state.V, out)
        if update:
            state.slot = state.filled = state.filled + 1
        state.x_prev, state.f_prev, state.held_native = x, f, True
        return out

    def _update(self, dx: Tensor, df: Tensor, state: BroydenState) -> None:
        """Add the rank-one update of the step ``dx`` (residual change ``df``) in slot ``filled`` (``< m``: the
        caller restarts a full memory)."""
        v = self._apply(state, dx, transpose=True)
        u = (dx - self._apply(state, df, transpose=False)) / torch.linalg.vecdot(v, df).unsqueeze(1)
        usable = (torch.isfinite(u).all(dim=1) & torch.isfinite(v).all(dim=1)).unsqueeze(1)
        s, zero = state.slot, u.new_zeros(())
        torch.where(usable, u, zero, out=state.U[:, s])
        torch.where(usable, v, zero, out=state.V[:, s])
        state.slot = s + 1
        state.filled = s + 1

    def select(self, state: BroydenState, keep: Tensor) -> BroydenState:
        held = (None, None) if state.x_prev is None else (state.x_prev.index_select(0, keep),
                                                          state.f_prev.index_select(0, keep))
        return BroydenState(U=keep_rows(state.U, keep, state.filled), V=keep_rows(state.V, keep, state.filled),
                            x_prev=held[0], f_prev=held[1], filled=state.filled,
                            slot=state.slot, kernel=state.kernel, held_native=state.held_native)
