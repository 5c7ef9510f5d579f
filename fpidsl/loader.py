"""Load compiled layers in memory: compile a spec to Python, cache by content hash, and register the
generated source so that a traceback through a compiled layer shows the generated line.

A layer class loaded here carries its spec (file name and text), so its instances pickle and unpickle
anywhere: ``torch.save(model)`` then ``torch.load(path, weights_only=False)`` in a new process recompiles the
class from the text it carries (:func:`_rebuild`), without the spec file or an earlier ``fpidsl.load``.
``copy.deepcopy`` goes the same way (through the cache, so it does not recompile).
"""
from __future__ import annotations

import linecache
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .codegen.emit import emit_module, spec_hash
from .compiler import check_source
from .frontend.read import read_source
from .source import Source

_CACHE: dict[str, types.ModuleType] = {}

# What a layer derives from its class in __init__ (functions and classes of the generated module, which pickle
# does not reach by name): dropped from the pickled state, re-derived on unpickling.
_DERIVED = ("_step_fn", "_adjoint_obj", "_hoisted")


def module_from_source(code: str, filename: str, module_name: str) -> types.ModuleType:
    """Execute generated code as a module, registered with ``linecache`` under ``filename``."""
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    module = types.ModuleType(module_name)
    module.__file__ = filename
    exec(compile(code, filename, "exec"), module.__dict__)  # noqa: S102 - code written by the compiler
    sys.modules.setdefault(module_name, module)
    return module


def module_key(file_name: str, text: str) -> str:
    """The cache key and module name suffix of a spec: its file name and text (two files with the same text
    get two modules; the same file name and text, anywhere, one)."""
    return spec_hash(file_name + "\0" + text)


def load_source(source: Source) -> types.ModuleType:
    """The compiled module of a spec given as a :class:`~fpidsl.source.Source` (cached)."""
    file_name = Path(source.path).name
    key = module_key(file_name, source.text)
    if key not in _CACHE:
        checked = check_source(source)
        code = emit_module(checked)
        filename = f"<fpidsl {file_name} {key[:12]}>"
        module = module_from_source(code, filename, f"fpidsl_compiled_{key[:16]}")
        for layer_name, cls in module.LAYERS.items():
            _carry_spec(cls, file_name, source.text, layer_name)
        _CACHE[key] = module
    return _CACHE[key]


def load_module(path: str) -> types.ModuleType:
    """The compiled module of a spec file (cached by its file name and text)."""
    return load_source(read_source(str(path)))


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


# ----------------------------------------------------------------------------------------------------------------
# Pickling


def layer_class(file_name: str, text: str, layer_name: str) -> type:
    """The class of layer ``layer_name`` of the spec ``text`` (named ``file_name``), compiled if not cached."""
    return load_source(Source(file_name, text)).LAYERS[layer_name]


def _rebuild(file_name: str, text: str, layer_name: str) -> nn.Module:
    """An empty instance of the layer class, for pickle to fill with ``__setstate__``."""
    cls = layer_class(file_name, text, layer_name)
    return cls.__new__(cls)


def _getstate(self: nn.Module) -> dict[str, Any]:
    state = self.__dict__.copy()
    for key in _DERIVED:
        state.pop(key, None)
    state["stats"] = None
    return state


def _setstate(self: nn.Module, state: dict[str, Any]) -> None:
    nn.Module.__setstate__(self, state)
    # Whatever __init__ derives and the state lacks (the dropped functions; attributes that a newer fpidsl
    # adds, when the state comes from an older one) comes from a fresh instance, without touching the RNG.
    generated = next(c for c in type(self).__mro__ if "_fpidsl_spec" in c.__dict__)
    with torch.random.fork_rng(devices=[]):
        externs = {name: state["_modules"][name] for name in generated.EXTERNS}  # the user's modules, as pickled
        fresh = generated(compile=bool(state.get("compiled", False)), **externs)
    for key, value in fresh.__dict__.items():
        if key not in self.__dict__:
            self.__dict__[key] = value


def _reduce_ex(self: nn.Module, protocol: int):
    cls = type(self)
    spec = cls.__dict__.get("_fpidsl_spec")
    if spec is None:  # a user's subclass: an importable class, pickled by reference (the state as below)
        return object.__reduce_ex__(self, protocol)
    return _rebuild, spec, self.__getstate__()


def _carry_spec(cls: type, file_name: str, text: str, layer_name: str) -> None:
    cls._fpidsl_spec = (file_name, text, layer_name)
    cls.__reduce_ex__ = _reduce_ex
    cls.__getstate__ = _getstate
    cls.__setstate__ = _setstate
