"""Fixed-point correction (Bai et al. 2022, torchdeq's ``n_states`` / ``gamma``): losses on intermediate iterates.

:func:`fixed_point_states` runs one solve and returns ``n_states`` states along its trajectory: the iterates at
iterations ``indexing`` (default: ``n_states - 1`` iterations spread uniformly over ``max_iter``,
``round(max_iter * i / n_states)``; torchdeq's ``uniform`` indexing is one iteration later from the second state on:
with ``n_states=3``, ``max_iter=30`` and one phantom step the states are f^11, f^21 here and f^11, f^22 in
torchdeq 0.1.0) and, last, the fixed point. A sample that finished before an index contributes its result
there. The last state is the fixed point with the backward's gradient (``implicit`` by default, or any mode);
each intermediate state ``z_i`` is attached by a phantom gradient: its value and gradient are those of ``k`` damped
steps ``z <- (1 - tau) z + tau f(z)`` from ``z_i`` held fixed, recorded by autograd (torchdeq's default is one
step). :func:`correction_loss` weighs the losses of the states ``gamma^(n-1-i)`` (the fixed point's weight 1).

The indices are iteration numbers of the solve: the correction needs a budget that the training iteration
actually runs (DEQ practice: ``max_iter`` of a few dozen); with early stopping, samples that converged before an
index contribute their fixed point there.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .driver import SNAPSHOTS
from .layout import StateLayout
from .settings import BACKWARD_DEFAULTS, FORWARD_DEFAULTS, SETTING_KEYS, resolve_settings
from .stats import Stats


def uniform_indexing(n_states: int, max_iter: int) -> tuple[int, ...]:
    """``n_states - 1`` iteration numbers spread uniformly over ``1..max_iter`` (the last state is the result)."""
    if not (isinstance(n_states, int) and not isinstance(n_states, bool) and n_states >= 1):
        raise ValueError(f"n_states must be an integer >= 1, got {n_states!r}")
    return tuple(sorted({max(1, round(max_iter * i / n_states)) for i in range(1, n_states)}))


def _steps(f: Callable, z: tuple[Tensor, ...], args: tuple, k: int, tau: float, single: bool) -> tuple[Tensor, ...]:
    for _ in range(k):
        fz = f(z[0] if single else z, *args)
        fz = (fz,) if single else tuple(fz)
        z = tuple(fi if tau == 1.0 else zi + tau * (fi - zi) for zi, fi in zip(z, fz))
    return z


def fixed_point_states(
    f: Callable, x0: Tensor | Sequence[Tensor], *args: Any, n_states: int = 2, indexing: Sequence[int] | None = None,
    k: int = 1, tau: float = 1.0, stats: Stats | None = None, return_stats: bool = False, **options: Any,
) -> Any:
    """``n_states`` states of one solve of ``x = f(x, *args)`` (see the module's doc), earliest first, each in the
    structure of ``x0``. ``options`` are :func:`~fpidsl.runtime.fixed_point`'s (settings, ``backward``, ``batched``,
    ``adjoint``, ...). ``stats`` (or the one returned with ``return_stats``) records the solve and, later, the
    fixed point's backward."""
    from .fixed_point import fixed_point

    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not (isinstance(tau, (int, float)) and 0 < tau <= 1):
        raise ValueError(f"tau must be a number with 0 < tau <= 1, got {tau!r}")
    settings = {key: options.pop(key) for key in list(options) if key in SETTING_KEYS}
    forward = resolve_settings(options.pop("solve", None), FORWARD_DEFAULTS).merged(settings)
    backward = resolve_settings(options.pop("backward", None), BACKWARD_DEFAULTS)
    if backward.mode == "unrolled":
        raise ValueError("fixed-point correction needs a solve; the unrolled mode has none")
    iterations = uniform_indexing(n_states, forward.max_iter) if indexing is None else tuple(indexing)
    if any(not (isinstance(i, int) and 1 <= i <= forward.max_iter) for i in iterations):
        raise ValueError(f"indexing must hold iteration numbers in 1..{forward.max_iter}, got {list(iterations)}")
    single = isinstance(x0, Tensor)
    starts = (x0,) if single else tuple(x0)
    layout = StateLayout.of(starts, options.get("per_sample", True))
    snapshots: dict[int, Tensor | None] = {i: None for i in iterations}
    first = Stats()
    token = SNAPSHOTS.set(snapshots)
    try:
        with torch.no_grad():
            solved = fixed_point(f, x0, *args, solve=forward, backward=backward, stats=first, **options)
    finally:
        SNAPSHOTS.reset(token)
    stats = Stats() if stats is None else stats
    # the fixed point attached to the backward: one evaluation from the solve's result (not a second solve: a
    # min_iter would run again, and a sample that failed would go on iterating)
    confirm = forward.merged({"max_iter": 1, "min_iter": 0, "on_fail": "ignore"})
    last = fixed_point(f, solved, *args, solve=confirm, backward=backward, stats=stats, **options)
    stats.forward = first.forward  # the solve's record (the confirming solve from its result took an iteration)
    states = []
    for i in iterations:
        # a half or bfloat16 solve runs in float32 (.precision): its iterates come back in the states' dtypes
        snapshot = tuple(s.to(x.dtype) for s, x in zip(layout.unflatten(snapshots[i]), starts))
        z = _steps(f, snapshot, tuple(args), k, tau, single)
        states.append(z[0] if single else z)
    states.append(last)
    return (states, stats) if return_stats else states


def correction_loss(losses: Sequence[Tensor], gamma: float = 0.8) -> Tensor:
    """``sum_i gamma^(n-1-i) losses[i]``: the fixed point's loss (last) with weight 1, earlier ones decaying."""
    if not losses:
        raise ValueError("correction_loss needs at least one loss")
    n = len(losses)
    return sum(gamma ** (n - 1 - i) * loss for i, loss in enumerate(losses))
