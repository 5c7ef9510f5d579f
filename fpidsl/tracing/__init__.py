"""The PyTorch front-end: a map written with torch traced into the compiler's layer graph (docs/TRACE.md).

:func:`trace` compiles ``g(x, *args)`` into a layer class; :mod:`~fpidsl.tracing.auto` is how
``fpidsl.fixed_point`` uses it: importing this package registers it with the runtime, and ``fpidsl.fixed_point`` /
``fpidsl.FixedPoint`` are re-exported from here, so they always trace (``fpidsl.runtime.fixed_point`` is the same
function, and traces once this package is imported). Imports torch (the compiler half does not).
"""
from __future__ import annotations

from ..runtime.fixed_point import FixedPoint, fixed_point
from .api import TracedMap, trace, trace_map
from .auto import TraceMismatchWarning, trace_status  # registers the planner fixed_point asks
from .fx_capture import UntraceableError

__all__ = ["FixedPoint", "TraceMismatchWarning", "TracedMap", "UntraceableError", "fixed_point", "trace", "trace_map",
           "trace_status"]
