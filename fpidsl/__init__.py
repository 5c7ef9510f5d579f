"""fpidsl: a language for differentiable fixed-point layers, compiled to PyTorch.

Re-exports only. The runtime (and torch) is imported on first use, so that ``fpidsl check`` stays quick.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "fpidsl.loader",
    "fixed_point": "fpidsl.tracing",  # the runtime's, with the trace front-end registered
    "FixedPoint": "fpidsl.tracing",
    "contraction_factor": "fpidsl.runtime.contraction",
    "plot_convergence": "fpidsl.plot",
    "ConvergenceError": "fpidsl.runtime.stats",
    "ConvergenceWarning": "fpidsl.runtime.stats",
    "SolverSettings": "fpidsl.runtime.settings",
    "SettingsError": "fpidsl.runtime.settings",
    "LayerInputError": "fpidsl.runtime.layer",
    "HiddenTensorError": "fpidsl.runtime.capture",
    "Hoisted": "fpidsl.runtime.fixed_point",
    "FpiError": "fpidsl.errors",
    "FpiErrors": "fpidsl.errors",
    "trace": "fpidsl.tracing",
    "UntraceableError": "fpidsl.tracing",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fpidsl' has no attribute {name!r}")
