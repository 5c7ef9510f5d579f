"""The PyTorch front-end: a map written with torch traced into the compiler's layer graph (docs/TRACE.md).

:func:`trace` compiles ``g(x, *args)`` into a layer class; :mod:`~fpidsl.tracing.auto` is how
``fpidsl.fixed_point`` uses it. Imports torch (the compiler half does not).
"""
from __future__ import annotations

from .api import TracedMap, trace, trace_map
from .auto import TraceMismatchWarning, trace_status
from .fx_capture import UntraceableError

__all__ = ["TraceMismatchWarning", "TracedMap", "UntraceableError", "trace", "trace_map", "trace_status"]
