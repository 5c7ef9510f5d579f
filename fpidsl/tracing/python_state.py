"""The Python state a trace may have fixed into its graph, as one hashable value (part of the trace cache's key).

torch.fx runs the map's Python once and keeps only its tensor operations: every Python value read on the way is
fixed into the graph (a module's ``self.alpha`` or ``self._alpha``, a config object's field, a dict or list entry,
a class attribute, a global of the map or of any function or method it calls, a function-valued attribute such as
``self.act = torch.tanh``, a submodule's type, a parameter that is None). :func:`python_state` walks what the map
can reach that way and returns a value that changes when any of them changes, so ``fixed_point`` traces the map
again instead of running with an old value (:mod:`fpidsl.tracing.auto`).

What is walked: the map (a function, a bound method and its object, a module, a callable object); for a module,
its attributes (private ones too), its submodules and their types, which parameters and buffers are None, how
many hooks it has (and torch's global module hooks); for an object, its ``__dict__``; for a user's class (not
one of torch's), its plain class attributes and the functions it defines; for a function, its defaults, its closure cells and the globals its code
(nested functions and comprehensions included) names. Containers are walked item by item. Tensors are not: the
trace reads them again at every call. What cannot be looked into (an object without ``__dict__`` that cannot be
hashed, a Python module) counts by identity. A walk that meets more than :data:`MAX_ITEMS` values raises
:class:`StateTooLarge`: the map is then not traced (the autograd path gives the same numbers).
"""
from __future__ import annotations

import types
from typing import Any

from torch import Tensor, nn

MAX_ITEMS = 20_000
MAX_DEPTH = 8

_SCALARS = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis))
_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})
_HOOK_TABLES = frozenset(k for k, v in vars(nn.Module()).items() if "hook" in k and isinstance(v, dict))  # counted
_CALLABLES = (types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodWrapperType,
              types.WrapperDescriptorType, types.MethodDescriptorType, types.ClassMethodDescriptorType)


class StateTooLarge(Exception):
    """The map reaches more Python values than the trace cache watches."""


def python_state(f: Any) -> tuple:
    """A hashable value that changes when a Python value that ``f`` may read changes (see the module's doc), torch's
    global module hooks included (``register_module_forward_hook``: they run in every module's call)."""
    return (_global_hooks(), _Walk().visit(f, 0))


def _global_hooks() -> tuple:
    from torch.nn.modules import module as torch_module

    tables = (torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks,
              torch_module._global_backward_pre_hooks, torch_module._global_backward_hooks)
    return tuple(tuple(id(hook) for hook in table.values()) for table in tables)


def _user_class(cls: type) -> bool:
    """A class whose methods and attributes the map's own code may read (not torch's, not Python's)."""
    module = getattr(cls, "__module__", "") or ""
    return not (module == "builtins" or module.startswith(("torch.", "torch")) or cls is object)


def _names(code: types.CodeType) -> list[str]:
    """The global names a code object and the code objects nested in it read."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _names(const)
    return names


class _Walk:
    def __init__(self) -> None:
        self.count = 0
        self.seen: dict[int, int] = {}
        self.keep: list[Any] = []  # the walked objects stay alive during the walk, so their ids stay theirs

    def visit(self, value: Any, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_ITEMS:
            raise StateTooLarge(f"the map reaches more than {MAX_ITEMS} Python values")
        if isinstance(value, _SCALARS):
            return (type(value), value)
        if isinstance(value, Tensor):
            return "tensor"  # read again at every call
        if isinstance(value, types.ModuleType):
            return ("python module", value.__name__)
        if isinstance(value, _CALLABLES):
            return ("callable", _identity(value))
        key = id(value)
        if key in self.seen:
            return ("seen", self.seen[key])
        self.seen[key] = len(self.seen)
        self.keep.append(value)
        if depth > MAX_DEPTH:
            return ("deep", type(value), _identity(value))
        return self._inside(value, depth + 1)

    def _inside(self, value: Any, depth: int) -> Any:
        if isinstance(value, types.FunctionType):
            return self._function(value, depth)
        if isinstance(value, types.MethodType):
            return ("method", self.visit(value.__func__, depth), self.visit(value.__self__, depth))
        if isinstance(value, type):
            return ("type", value, self._class(value, depth) if _user_class(value) else ())
        if isinstance(value, (list, tuple)):
            return (type(value), tuple(self.visit(v, depth) for v in value))
        if isinstance(value, (set, frozenset)):
            return (type(value), frozenset(self.visit(v, depth) for v in value))
        if isinstance(value, dict):
            return (type(value), tuple((self.visit(k, depth), self.visit(v, depth)) for k, v in value.items()))
        if isinstance(value, nn.Module):
            return self._module(value, depth)
        fields = getattr(value, "__dict__", None)
        if isinstance(fields, dict):
            return ("object", self.visit(type(value), depth), self.visit(fields, depth))
        return ("value", type(value), _identity(value))

    def _function(self, fn: types.FunctionType, depth: int) -> tuple:
        cells = []
        for cell in fn.__closure__ or ():
            try:
                cells.append(self.visit(cell.cell_contents, depth))
            except ValueError:  # an empty cell
                cells.append("empty")
        names = tuple((n, self.visit(fn.__globals__[n], depth)) for n in dict.fromkeys(_names(fn.__code__))
                      if n in fn.__globals__)
        return ("function", fn.__code__, self.visit(fn.__defaults__, depth), self.visit(fn.__kwdefaults__, depth),
                tuple(cells), names)

    def _class(self, cls: type, depth: int) -> tuple:
        """A user's class: its plain attributes and the functions it defines, class by class of its MRO."""
        out = []
        for klass in cls.__mro__:
            if not _user_class(klass):
                continue
            for name, v in vars(klass).items():
                if name.startswith("__") and name.endswith("__"):
                    continue
                if isinstance(v, (staticmethod, classmethod)):
                    v = v.__func__
                out.append((name, self.visit(v, depth)))
        return tuple(out)

    def _module(self, module: nn.Module, depth: int) -> tuple:
        fields = tuple((k, len(v) if k in _HOOK_TABLES else self.visit(v, depth))
                       for k, v in vars(module).items() if k not in _MODULE_INTERNALS)
        tensors = tuple((k, v is None) for k, v in (*module._parameters.items(), *module._buffers.items()))
        children = tuple((k, self.visit(v, depth)) for k, v in module._modules.items())
        return ("nn.Module", self.visit(type(module), depth), fields, tensors, children)


def _identity(value: Any) -> Any:
    """``value`` where it can be hashed (a builtin, an enum, a dtype), else its id."""
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value
