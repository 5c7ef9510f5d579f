"""Mixed precision: the solver's arithmetic in a safe dtype, the precision floor from the compute dtype.

A fixed point of a map computed in bfloat16 or float16 (a layer converted with ``.to(torch.bfloat16)``, or a
float32 layer under ``torch.autocast``) is solved as follows:

- the solver (its iterate, Anderson's least-squares system, the convergence tests) works in float32 when the
  states are half or bfloat16, and in the states' dtype otherwise (float32, float64); the map receives its states
  in their own dtype and its output is cast to the solver's dtype (under autocast the output of a float32 map is
  often bfloat16). The result is returned in the states' dtype. The solver runs with autocast off (Anderson's
  small linear system in bfloat16 would fail or lose the mixing), the map under the caller's autocast.
- the precision floor (:mod:`fpidsl.runtime.driver`: a sample whose relative residual stays within a few
  machine epsilons is at the floor, and done) uses the epsilon of the least precise dtype the map computes in
  that fpidsl can see: the states' and, under autocast, the autocast dtype, unless the states are float64
  (autocast casts no float64 tensor: a float64 map under autocast computes in float64, and the bfloat16 floor
  passed its iteration stuck at a 4% relative residual as done). A bfloat16 map cannot resolve a
  relative residual below about ``2**-8``; without this, the solver judged the float32 state and ran all
  ``max_iter`` iterations. The arguments' dtypes do not count: a bfloat16 argument of a float64 map is promoted by
  torch, the map computes in float64, and its floor (``10 * 2**-7``, 8% relative) accepted an iteration stuck at a
  relative residual of 2% as done, with no warning. A map that casts its state down inside (``x.to(W.dtype)``)
  gets the states' floor: it warns where its tolerance is finer than its arithmetic, and never passes silently.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLOOR_EPS: contextvars.ContextVar[float] = contextvars.ContextVar("fpidsl_floor_eps", default=0.0)


def solver_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the solver's arithmetic for states of ``state_dtype``."""
    return torch.float32 if state_dtype in _LOW_PRECISION else state_dtype


def compute_eps(state: Tensor) -> float:
    """The machine epsilon of the least precise dtype the map computes in, as far as fpidsl sees it: the states'
    and the autocast dtype where autocast casts the states (not float64; see the module's doc)."""
    dtypes = {state.dtype}
    device = state.device.type
    if torch.is_autocast_enabled(device) and state.dtype != torch.float64:  # autocast leaves float64 alone
        dtypes.add(torch.get_autocast_dtype(device))
    return max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)


def floor_eps(dtype: torch.dtype) -> float:
    """The epsilon the precision floor uses for a solve whose iterate has ``dtype`` (read by the driver)."""
    return max(torch.finfo(dtype).eps, _FLOOR_EPS.get())


@contextmanager
def _floor(eps: float) -> Iterator[None]:
    token = _FLOOR_EPS.set(eps)
    try:
        yield
    finally:
        _FLOOR_EPS.reset(token)


def autocast_output(state: Tensor, dtype: torch.dtype) -> Tensor:
    """A map's output state in the states' ``dtype`` where autocast computed it in another floating dtype."""
    if (state.dtype != dtype and state.is_floating_point() and dtype.is_floating_point
            and torch.is_autocast_enabled(state.device.type)):
        return state.to(dtype)
    return state


class _Casting:
    """An evaluator that gives the map its states in ``state`` dtype and returns the output in ``work`` dtype;
    the map runs under the caller's autocast (``autocast``: device type and dtype), the solver without."""

    def __init__(self, inner: Any, state: torch.dtype, work: torch.dtype, autocast: tuple[str, torch.dtype] | None):
        self.inner, self.state, self.work, self.autocast = inner, state, work, autocast

    def __call__(self, x: Tensor) -> Tensor:
        if self.autocast is None:
            return self.inner(x.to(self.state)).to(self.work)
        device, dtype = self.autocast
        with torch.autocast(device, dtype=dtype):
            y = self.inner(x.to(self.state))
        return y.to(self.work)

    def restrict(self, index: Tensor) -> None:
        self.inner.restrict(index)


def solve_in_safe_dtype(solve: Callable[..., tuple[Tensor, Any]], evaluate: Any, start: Tensor, settings: Any,
                        **options: Any) -> tuple[Tensor, Any]:
    """``solve(evaluate, start, settings, **options)`` with the arithmetic and the floor of the module's doc;
    the result has ``start``'s dtype."""
    work = solver_dtype(start.dtype)
    device = start.device.type
    autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
    if work != start.dtype or autocast is not None:  # otherwise both casts would return their input
        evaluate = _Casting(evaluate, start.dtype, work, autocast)
    off = torch.autocast(device, enabled=False) if autocast is not None else nullcontext()
    with _floor(compute_eps(start)), off:  # the solver without the caller's autocast, where it has one
        flat, stats = solve(evaluate, start.to(work), settings, **options)
    return flat.to(start.dtype), stats
