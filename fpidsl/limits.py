"""The compiler's size limits, and running it with a stack deep enough for them.

The front-end and the passes walk expressions recursively. Rather than being limited by Python's default
recursion limit (about 1000 frames: 243 nested calls were enough to crash), the compiler runs in a thread
with a large stack (:data:`STACK_BYTES`, reserved, not committed) and a raised recursion limit, and refuses
what is deeper than :data:`MAX_NESTING` with a positioned error instead:

* an expression nested more than ``MAX_NESTING`` levels (calls in calls, a sum of that many terms, ...);
* a chain of lets, energies and fn calls (each using the next) more than ``MAX_CHAIN`` long.

:func:`run_deep` is re-entrant: called inside the compiler's thread, it calls directly.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable, TypeVar

MAX_NESTING = 10_000  # levels of one expression
MAX_CHAIN = 5_000  # lets / energies / fn calls, each defined by the next
STACK_BYTES = 256 << 20  # the compiler thread's stack (address space; 64 MiB were measured to hold MAX_NESTING)
RECURSION_LIMIT = 400_000

T = TypeVar("T")

_lock = threading.Lock()
_active = 0
_saved_limit = 0
_local = threading.local()


def run_deep(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a thread with a deep stack; its result, or its exception re-raised here."""
    if getattr(_local, "deep", False):
        return fn(*args, **kwargs)
    outcome: dict[str, Any] = {}

    def body() -> None:
        _local.deep = True
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread  # noqa: BLE001
            outcome["error"] = exc

    global _active, _saved_limit
    with _lock:
        if _active == 0:
            _saved_limit = sys.getrecursionlimit()
            sys.setrecursionlimit(max(_saved_limit, RECURSION_LIMIT))
        _active += 1
    try:
        with _lock:
            previous = threading.stack_size()
            try:
                threading.stack_size(STACK_BYTES)
                worker = threading.Thread(target=body, name="fpidsl-compiler", daemon=True)
                worker.start()
            except RuntimeError:  # no memory (or no thread left) for the stack
                raise MemoryError(f"cannot start the compiler's thread with a {STACK_BYTES >> 20} MiB stack") from None
            finally:
                threading.stack_size(previous)
        worker.join()
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                sys.setrecursionlimit(_saved_limit)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
