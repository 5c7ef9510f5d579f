"""The interface version between emitted layer modules and the runtime (torch-free, so the compiler can read it
without importing the runtime; :mod:`fpidsl.runtime.version` checks it).

``RUNTIME_INTERFACE`` changes whenever code emitted by one fpidsl would not run correctly on the runtime of
another (a hook renamed, an argument added).
"""
from __future__ import annotations

RUNTIME_INTERFACE = 1


def emitted_check(generated_by: str) -> list[str]:
    """The lines an emitted module runs after its imports: it refuses a runtime of another interface."""
    return ["from fpidsl.runtime import version as _version", "",
            f"_version.require_runtime({RUNTIME_INTERFACE}, {generated_by!r})"]
