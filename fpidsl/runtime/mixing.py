"""Whether a map ``f(x, *args)`` given to ``fixed_point`` without a trace mixes the samples of its batch.

The solver judges every sample (row of dimension 0) alone and holds a finished one fixed while the others move
on (``per_sample``, by default). That is right only where no sample's value depends on another's: for a map
that mixes them (a mean or a max over the batch, batch norm in training mode, attention across the batch,
``x.T @ x``, a reshape that merges the batch) a sample frozen early came back at a point that was no longer fixed
once its neighbours moved, with no warning (0.47 off, and 1.2 in the gradient, on a mean over the batch). A
compiled spec or a traced map knows whether it mixes (``SAMPLEWISE``); a map run through autograd does not, so
:func:`mixes_samples` asks it: ``f`` is evaluated at the start and at four moved copies (the first sample far
up, the others far down, so that a max or a min over the batch moves; the first sample a little, and the last a
little, for a coupling that far moves switch off and for one among the later samples), and a sample whose value
changed though it was not moved depends on another. Such a map is solved as one problem over the whole batch, as
a compiled layer that mixes is. A move that makes ``f`` raise (out of its domain) gives no answer.

The test is a probe, not a proof: a dependence that no move shows (between two middle samples only, behind a
threshold no move crosses) is not seen. The moves are drawn from a generator of their own, and the caller's
random-number state is restored after the probe (a map with dropout draws from it). A map that gives other values
at every call (dropout, a counter) cannot be probed so, and is taken as samplewise, as before. It costs five
evaluations of ``f`` without autograd and one host read a call (six and two where it finds a mix).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

_SEED = 20211019
SMALL = 0.03  # the small moves' spread, in the state's scale


def mixes_samples(evaluate: Callable[[tuple[Tensor, ...]], Sequence[Tensor]], states: tuple[Tensor, ...]) -> bool:
    """Whether ``evaluate`` (the map on a tuple of batched states, returning a tuple) makes some sample's value
    depend on another sample's, as far as the module doc's four moves show. States without at least two samples
    never mix. One host read (two where it finds a mix)."""
    batch = states[0].shape[0] if states and states[0].dim() > 0 else 0
    if batch < 2 or not all(s.dim() > 0 and s.shape[0] == batch and s.is_floating_point() for s in states):
        return False
    generator = torch.Generator(device=states[0].device).manual_seed(_SEED)
    devices = [s.device for s in states if s.device.type == "cuda"]
    last = slice(batch - 1, batch)
    with torch.no_grad(), torch.random.fork_rng(devices=devices[:1]):
        base = _outputs(evaluate, tuple(s.detach().clone() for s in states), batch)  # the caller's x0 untouched
        if base is None:
            return False
        changed = []
        scales = [s.detach().abs().amax().add_(1.0) if s.numel() else None for s in states]
        for moved, kept, shift, spread in ((slice(0, 1), slice(1, batch), 4.0, 2.0),
                                           (slice(1, batch), slice(0, 1), -4.0, 2.0),
                                           (slice(0, 1), slice(1, batch), 0.0, SMALL),
                                           (last, slice(0, batch - 1), 0.0, SMALL)):
            try:
                out = _outputs(evaluate, tuple(_moved(s, scale, moved, shift, spread, generator)
                                               for s, scale in zip(states, scales)), batch)
            except Exception:  # noqa: BLE001 - a move out of the map's domain (an index, a Cholesky): no answer
                continue
            if out is None or len(out) != len(base):
                continue
            changed += [_changed(a[kept], b[kept]) for a, b in zip(base, out)]
        if not changed or not bool(torch.stack(changed).any()):
            return False
        again = _outputs(evaluate, tuple(s.detach().clone() for s in states), batch)  # other values every call?
        return again is not None and not bool(torch.stack([_changed(a, b) for a, b in zip(base, again)]).any())


def _outputs(evaluate: Callable, states: tuple[Tensor, ...], batch: int) -> tuple[Tensor, ...] | None:
    out = evaluate(states)
    out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if not all(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch for t in out):
        return None  # not states of this batch: the solve reports it
    return out


def _moved(state: Tensor, scale: Tensor | None, rows: slice, shift: float, spread: float,
           generator: torch.Generator) -> Tensor:
    """``state`` with ``rows`` moved by ``scale`` (1 + its largest magnitude) times ``shift`` plus ``spread``
    normal noise: far up (the first sample becomes the largest: a max over the batch moves), far down (the others
    the smallest: a min), or a little (a coupling that a far move switches off, a kernel exp(-|x_i - x_j|^2))."""
    out = state.detach().clone()
    if scale is not None:
        noise = torch.randn(out[rows].shape, generator=generator, dtype=state.dtype, device=state.device)
        out[rows].addcmul_(noise.mul_(spread).add_(shift), scale)
    return out


def _changed(before: Tensor, after: Tensor) -> Tensor:
    """Whether a sample's output moved beyond rounding, as a tensor (no host read): a samplewise map gives the same
    bits, and the slack (64 eps, relative and absolute) allows for kernels whose summation order depends on more
    than the sample; NaN where NaN was is no move."""
    if not (before.is_floating_point() or before.is_complex()):
        return (before != after).any()
    slack = 64 * torch.finfo(before.dtype).eps
    return ~torch.isclose(before, after, rtol=slack, atol=slack, equal_nan=True).all()
