"""Legal, unique Python identifiers for generated code (after torch.fx's ``_Namespace``)."""
from __future__ import annotations

import builtins
import keyword
import re

_ILLEGAL = re.compile(r"[^0-9a-zA-Z_]+")
# Every identifier the emitted code itself uses: the module's globals, and the arguments and locals the code
# generator writes in its functions (step's ``states``, init_states' ``dims``/``like``, the adjoint's ``x_hat``,
# ``args``, ``saved``, ``c`` and ``needs``). A user's name that is one of them is renamed (``needs_1``).
EMITTER_NAMES = frozenset({"torch", "self", "_ops", "_layer", "_", "LAYERS", "states", "dims", "like", "x_hat",
                           "args", "saved", "c", "needs"})
_RESERVED = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins)) | EMITTER_NAMES


class Namespace:
    """Hands out identifiers: a candidate is sanitised, kept off keywords, builtins and the generated
    module's own globals, and numbered when taken (``h``, ``h_1``, ...)."""

    def __init__(self, reserved: tuple[str, ...] = ()) -> None:
        self._taken: set[str] = set(_RESERVED) | set(reserved)
        self._counts: dict[str, int] = {}

    def create(self, candidate: str) -> str:
        base = _ILLEGAL.sub("_", candidate) or "v"
        if base[0].isdigit():
            base = f"v_{base}"
        if base.startswith("__"):  # dunder names (``__builtins__``, ``__name__``) mean something to Python
            base = f"v{base}"
        name = base
        while name in self._taken:
            self._counts[base] = self._counts.get(base, 0) + 1
            name = f"{base}_{self._counts[base]}"
        self._taken.add(name)
        return name
