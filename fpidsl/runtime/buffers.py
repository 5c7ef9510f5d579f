"""Evaluations that must not count as the map's: a module's buffers (``BatchNorm``'s running statistics in
training mode) are put back after them, so only the solver's evaluations of the map update them, on every path
(the trace's records and check, the capture check after a solve)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn


def modules_of(f: Callable, *more: object) -> list[nn.Module]:
    """The modules whose buffers an evaluation of ``f`` changes: ``f`` itself, a bound method's object, and those of
    ``more`` that are modules (what a trace found ``f`` reading)."""
    return [m for m in (f, getattr(f, "__self__", None), *more) if isinstance(m, nn.Module)]


@contextmanager
def kept_buffers(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every buffer of the modules (and their submodules) is as it was on entry again on leaving: the same tensor,
    its values put back where they changed (only there: a copy bumps its version, and an autograd graph that saved it
    would fail); for evaluations that must not count as the map's (the trace's records and checks, the capture
    check)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # a transform's buffer (vmap over an ensemble's
    saved = [(m._buffers, key, b, b._version, b.clone()) for root in modules for m in root.modules()  # stacked ones)
             for key, b in m._buffers.items() if b is not None and not b.is_inference() and not wrapped(b)]
    try:
        yield
    finally:
        with torch.no_grad():
            for table, key, buffer, version, value in saved:
                table[key] = buffer
                if buffer._version != version or not torch.equal(buffer, value):  # batch_norm keeps the version
                    buffer.copy_(value)
