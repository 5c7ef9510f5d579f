"""The solvers' history buffers: ``(batch, m, dim)``, a ring of ``m`` slots per sample (Anderson's differences,
Broyden's rank-one updates), of which only the filled slots are ever read."""
from __future__ import annotations

import torch
from torch import Tensor


def keep_rows(buffer: Tensor, keep: Tensor, filled: int) -> Tensor:
    """The rows ``keep`` of a ``(batch, m, dim)`` history buffer whose slots from ``filled`` on are written before
    they are read: the first ``filled`` slots copied, the others left unwritten (a Broyden memory of 50 holds
    far fewer updates than that for most of a solve)."""
    out = buffer.new_empty((keep.shape[0], *buffer.shape[1:]))
    if filled:
        torch.index_select(buffer[:, :filled], 0, keep, out=out[:, :filled])
    return out
