"""The states of a fixed point as one matrix: a row per sample, the states of that sample side by side.

The solvers and the convergence test see ``(batch, dim)``; the map ``f`` sees the states in their own shapes.
Dimension 0 of every state is the batch; the per-sample norm runs over all other dimensions of all states
together. With ``per_sample=False`` the whole state is one sample (row). A batch of 0 samples is a
``(0, dim)`` matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .precision import autocast_output

States = tuple[Tensor, ...]


@dataclass(frozen=True)
class StateLayout:
    """Shapes of the states (without the batch dimension when ``per_sample``), their dtype and device."""

    shapes: tuple[tuple[int, ...], ...]
    per_sample: bool
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(states: States, per_sample: bool = True) -> "StateLayout":
        """The layout of ``states``; raises ``ValueError`` for states that cannot be iterated together."""
        if not states:
            raise ValueError("fixed_point needs at least one state tensor in x0")
        for i, s in enumerate(states):
            if not isinstance(s, Tensor):
                raise TypeError(f"x0 must be a tensor or a tuple of tensors; entry {i} is {type(s).__name__}")
            if not s.is_floating_point():
                raise ValueError(f"state {i} must have a floating dtype, got {s.dtype}")
        first = states[0]
        if any(s.dtype != first.dtype or s.device != first.device for s in states):
            found = ", ".join(f"{s.dtype} on {s.device}" for s in states)
            raise ValueError(f"all states must share one dtype and device, got {found}")
        if not per_sample:
            return StateLayout(tuple(tuple(s.shape) for s in states), False, first.dtype, first.device)
        if any(s.dim() == 0 for s in states):
            raise ValueError(
                "each state needs a leading batch dimension (dimension 0 holds the samples); "
                "add one with x[None], or pass per_sample=False to treat the whole state as one sample"
            )
        batch = first.shape[0]
        if any(s.shape[0] != batch for s in states):
            found = ", ".join(str(tuple(s.shape)) for s in states)
            raise ValueError(f"all states must have the same batch size in dimension 0, got shapes {found}")
        return StateLayout(tuple(tuple(s.shape[1:]) for s in states), True, first.dtype, first.device)

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    def flatten(self, states: States) -> Tensor:
        """``(batch, dim)`` from states; checks that they have this layout (a map's output must)."""
        if len(states) == 1 and self.per_sample and len(self.shapes) == 1:  # the common case, in three tests
            s = states[0]
            if s.dtype == self.dtype and s.shape[1:] == self.shapes[0] and s.dim() > 0:
                return s if s.dim() == 2 else s.reshape(s.shape[0], self.sizes[0])  # (batch, dim) already
        if len(states) != len(self.shapes):
            raise ValueError(f"the map returned {len(states)} states, expected {len(self.shapes)}")
        states = tuple(autocast_output(s, self.dtype) for s in states)  # fpidsl.runtime.precision
        rows = states[0].shape[0] if self.per_sample else 1
        for i, (s, shape) in enumerate(zip(states, self.shapes)):
            found = s.shape[1:] if self.per_sample else s.shape
            if found != shape or s.dtype != self.dtype or (self.per_sample and s.shape[0] != rows):
                expected = (rows, *shape) if self.per_sample else shape
                raise ValueError(
                    f"the map returned state {i} with shape {tuple(s.shape)} and dtype {s.dtype}; the state has "
                    f"shape {tuple(expected)} and dtype {self.dtype} (f(x, *args) must return x's structure)"
                )
        # explicit sizes, not -1: with a batch of 0 samples (rows == 0), -1 would be ambiguous
        if len(states) == 1:
            return states[0].reshape(rows, self.sizes[0])
        return torch.cat([s.reshape(rows, size) for s, size in zip(states, self.sizes)], dim=1)

    def unflatten(self, flat: Tensor) -> States:
        """The states, as views of ``flat`` (``(batch, dim)``)."""
        rows = flat.shape[0]
        if len(self.shapes) == 1:
            if self.per_sample and len(self.shapes[0]) == 1:  # a state of one dimension a sample: flat itself
                return (flat,)
            return (flat.reshape((rows, *self.shapes[0]) if self.per_sample else self.shapes[0]),)
        parts = torch.split(flat, self.sizes, dim=1)
        return tuple(p.reshape(self._shape(rows, shape)) for p, shape in zip(parts, self.shapes))

    def _shape(self, rows: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (rows, *shape) if self.per_sample else shape
