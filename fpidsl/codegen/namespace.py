"""Legal, unique Python identifiers for generated code (after torch.fx's ``_Namespace``)."""
from __future__ import annotations

import builtins
import keyword
import re

_ILLEGAL = re.compile(r"[^0-9a-zA-Z_]+")
_RESERVED = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {"torch", "self", "_ops", "_layer"}


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
        name = base
        while name in self._taken:
            self._counts[base] = self._counts.get(base, 0) + 1
            name = f"{base}_{self._counts[base]}"
        self._taken.add(name)
        return name
