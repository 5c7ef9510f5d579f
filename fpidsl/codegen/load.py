"""Load compiled layers in memory: compile a spec to Python, cache by content hash, and register the
generated source so that a traceback through a compiled layer shows the generated line."""
from __future__ import annotations

import linecache
import sys
import types
from pathlib import Path

from ..compiler import check_source
from ..source import read_source
from .emit import emit_module, spec_hash

_CACHE: dict[str, types.ModuleType] = {}


def module_from_source(code: str, filename: str, module_name: str) -> types.ModuleType:
    """Execute generated code as a module, registered with ``linecache`` under ``filename``."""
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    module = types.ModuleType(module_name)
    module.__file__ = filename
    exec(compile(code, filename, "exec"), module.__dict__)  # noqa: S102 - code written by the compiler
    sys.modules.setdefault(module_name, module)
    return module


def load_module(path: str) -> types.ModuleType:
    """The compiled module of a spec file (cached by the hash of its text)."""
    source = read_source(str(path))
    key = spec_hash(source.text) + ":" + str(Path(path).name)
    if key not in _CACHE:
        checked = check_source(source)
        code = emit_module(checked)
        filename = f"<fpidsl {Path(path).name} {key[:12]}>"
        _CACHE[key] = module_from_source(code, filename, f"fpidsl_compiled_{key[:16]}")
    return _CACHE[key]


def load(path: str, name: str | None = None):
    """The class of layer ``name`` compiled from ``path`` (``.fpi`` or YAML); ``name`` may be omitted
    when the file has one layer."""
    module = load_module(path)
    layers = module.LAYERS
    if name is None:
        if len(layers) != 1:
            raise ValueError(f"{path} has {len(layers)} layers ({', '.join(layers)}); pass name=...")
        return next(iter(layers.values()))
    if name not in layers:
        raise ValueError(f"{path} has no layer named {name!r}; it has: {', '.join(layers)}")
    return layers[name]
