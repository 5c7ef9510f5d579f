"""How ``fpidsl.fixed_point(f, x0, *args)`` uses the trace: a compiled map when ``f`` traces, else nothing.

:func:`traced_plan` returns what ``fixed_point`` should call instead of ``f`` (the compiled layer's ``step``, its
derived ``adjoint``, its hoisted form, and the arguments: the tensor arguments then the map's own tensors, read
from ``f`` at every call so that training a module's weights is seen), or None: then ``fixed_point`` runs its
autograd path, which gives the same numbers. A map is traced once per *signature* (the shapes, dtypes, devices
and ``requires_grad`` of ``x0`` and of the tensor arguments, the values of the other arguments, ``batched``,
``per_sample`` and the module's training flag), and the result is kept in a cache keyed weakly by ``f`` (by the
object of a bound method), so a module is not kept alive by it.

A traced map is used only where it was checked to give ``f``'s numbers at the first call's ``x0`` and at a
perturbed one (:func:`~fpidsl.tracing.api.check_agrees`); where it does not, ``fixed_point`` falls back and says
so once (:class:`TraceMismatchWarning`). A map that cannot be traced (an operation with no primitive, control
flow on values) falls back silently: the result is the same, only slower. A tensor that ``f`` reads without
owning it or taking it as an argument (a closure cell, a global) is looked up again at every call; if it was
replaced, the map is traced again, and so it is when a Python value it may read changes (a module's
``self.scale``, a config object's field, a class attribute, a global of a function it calls, a submodule's type:
fx fixes those into the graph; :mod:`fpidsl.tracing.python_state`). A function whose code was
traced :data:`MAX_TRACES` times (a new closure at every call), or a map traced for :data:`MAX_TRACES` signatures,
is not traced any more.
"""
from __future__ import annotations

import threading
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..runtime.buffers import modules_of
from ..runtime.capture import hooked_modules
from ..runtime.fixed_point import Hoisted, register_trace_planner
from .api import TracedMap, trace_map
from .fx_capture import UntraceableError
from .python_state import MAX_ITEMS, StateTooLarge, python_state

MAX_TRACES = 8


class TraceMismatchWarning(UserWarning):
    """A traced map did not give the numbers of the map itself; ``fixed_point`` uses the map (autograd path)."""


@dataclass(frozen=True)
class Plan:
    """What ``fixed_point`` calls for a traced ``f``: ``step(x, *arguments)`` with ``adjoint`` and ``hoisted``."""

    step: Callable
    arguments: tuple
    adjoint: Any
    hoisted: Hoisted | None
    batched: tuple[bool, ...] | None
    per_sample: bool | None  # False where the traced map mixes samples (the batch is one problem, judged as a
    # whole); None where that is not known (see traced_plan): fixed_point probes f (fpidsl.runtime.mixing)
    hooked: tuple = ()  # f's modules with a hook-based norm (fpidsl.runtime.capture.refresh_hooked_weights)


@dataclass(eq=False)
class _Entry:
    traced: TracedMap | None  # None: f does not trace with this signature
    located: tuple  # (getter, object) of each foreign object: it must still be there
    reason: str = ""  # why not, where traced is None
    hooked: tuple = ()  # the modules with a hook-based norm, found once at the trace (a new hook is a new signature)


_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
# One trace at a time in the process: torch.fx patches nn.Module.__call__ for everyone while it traces, and two
# traces at once restored each other's patch, leaving it in place (every module call then returned a Proxy, in
# fpidsl and outside it) and caching "the map returns Proxy" for the map.
_TRACE_LOCK = threading.RLock()
_TRACES: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()  # code object -> traces made
_WARNED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _owner(f: Callable) -> tuple[Any, Any]:
    """The object the cache is keyed by, and the rest of the key (a bound method: its object and function)."""
    if isinstance(f, types.MethodType):
        return f.__self__, f.__func__
    return f, None


def _signature(x0: Any, args: Sequence[Any], batched, per_sample: bool, state: tuple) -> tuple | None:
    parts: list[Any] = [type(x0)]
    for a in (*((x0,) if isinstance(x0, Tensor) else x0), *args):
        if isinstance(a, Tensor):
            parts.append((tuple(a.shape), a.dtype, a.device, a.requires_grad))
        else:
            try:
                hash(a)
            except TypeError:
                return None
            parts.append(("value", type(a), a))
    return (tuple(parts), None if batched is None else tuple(batched), per_sample, state)


def _unlocated(f: Callable, foreign: dict[str, Any]) -> str:
    """Why :func:`_locations` found no way to read again an object ``f`` reads without owning it: what the object is."""
    fn = f.__func__ if isinstance(f, types.MethodType) else f
    if not isinstance(fn, types.FunctionType):
        return ("the map is a callable object that reads a module or tensor it does not own (neither its own, an "
                "argument, nor in a closure, defaults or globals, where a replaced value would be seen)")
    for obj in foreign.values():
        if _locations(f, {"x": obj}) is None:
            if isinstance(obj, nn.Module):
                return (f"the map reads a {type(obj).__name__} module that is neither its own, an argument, nor in its "
                        "closure, defaults or globals, but reached through an attribute of one (`self.f` in `lambda "
                        "z: self.f(z, x)`): a replaced module would go unseen; pass the module as the map, "
                        "fixed_point(self.f, z0, x)")
            if isinstance(obj, torch.Tensor):
                return (f"the map reads a tensor of shape {list(obj.shape)} that torch.fx computed while tracing (from "
                        "a tensor the map reads without taking it as an argument: `w / w.norm()` of a global, a "
                        "submodule's weight reshaped) or reached through an attribute of a closure's object: it would "
                        "be kept at its value now; pass it, or what it is computed from, as an argument")
    return ("the map reads a module or tensor that is neither its own, an argument, nor in its closure, defaults or "
            "globals (where a replaced value would be seen)")


def _locations(f: Callable, foreign: dict[str, Any]) -> tuple | None:
    """For each object ``f`` reads without owning it: how to read it again (a closure cell, a global, a default).
    None where one cannot be found (then ``f`` is not traced: a replaced value would go unseen)."""
    fn = f.__func__ if isinstance(f, types.MethodType) else f
    if not foreign:
        return ()
    if not isinstance(fn, types.FunctionType):
        return None
    getters: list[Callable[[], Any]] = []
    if isinstance(f, types.MethodType):  # a method reads its object's attributes (self.fc)
        obj = f.__self__
        names = ([*obj._modules, *obj._parameters, *obj._buffers] if isinstance(obj, nn.Module) else
                 list(getattr(obj, "__dict__", {})))
        getters += [lambda obj=obj, name=name: getattr(obj, name, None) for name in names]
    for cell in fn.__closure__ or ():
        getters.append(lambda cell=cell: cell.cell_contents)
    for name in fn.__code__.co_names:
        if name in fn.__globals__:
            getters.append(lambda name=name, g=fn.__globals__: g.get(name))
    for i, _ in enumerate(fn.__defaults__ or ()):
        getters.append(lambda i=i: fn.__defaults__[i])
    located = []
    for obj in foreign.values():
        getter = next((g for g in getters if _safe(g) is obj), None)
        if getter is None:
            return None
        located.append((getter, obj))
    return tuple(located)


def _safe(getter: Callable[[], Any]) -> Any:
    try:
        return getter()
    except ValueError:  # an empty cell
        return None


def _fresh(entry: _Entry) -> bool:
    return all(_safe(getter) is obj for getter, obj in entry.located)


def _trace(f: Callable, x0: Tensor, args: Sequence[Any], batched) -> _Entry:
    code = getattr(f.__func__ if isinstance(f, types.MethodType) else f, "__code__", None)
    if code is not None:
        count = _TRACES.get(code, 0)
        if count >= MAX_TRACES:
            return _Entry(None, (), f"this function's code was traced {MAX_TRACES} times already (a new closure at "
                                    "every call?): pass the tensors it reads as arguments")
        _TRACES[code] = count + 1
    try:
        start = x0.detach() if isinstance(x0, Tensor) else type(x0)(s.detach() for s in x0)
        traced = trace_map(f, start, [a.detach() if isinstance(a, Tensor) else a for a in args], batched)
    except UntraceableError as exc:
        if "differs from the map" in str(exc):
            _warn_once(f, str(exc))
        return _Entry(None, (), str(exc))
    except Exception as exc:  # a bug of the tracer must not stop a map that autograd solves
        return _Entry(None, (), f"the tracer failed ({type(exc).__name__}: {exc}); this is a bug in fpidsl, please "
                                "report it with the map")
    located = _locations(f, traced.foreign)
    if located is None:
        return _Entry(None, (), _unlocated(f, traced.foreign))
    modules = (*modules_of(f), *(m for m in traced.foreign.values() if isinstance(m, nn.Module)))
    return _Entry(traced, located, hooked=tuple(hooked_modules(modules)))


def _warn_once(f: Callable, message: str) -> None:
    owner, _ = _owner(f)
    try:
        if owner in _WARNED:
            return
        _WARNED.add(owner)
    except TypeError:  # not weakly referable: warn every time
        pass
    warnings.warn(f"fixed_point: not using the traced map ({message}); using f itself (autograd), which is "
                  "slower. Pass trace=False to skip tracing this map.", TraceMismatchWarning, stacklevel=4)


def _entry(f: Callable, x0: Any, args: Sequence[Any], batched: Sequence[bool] | None,
           per_sample: bool | None) -> tuple[_Entry | None, tuple]:
    """The cache entry of this call (traced now if needed) with the map's tensors, or None and a reason."""
    states = (x0,) if isinstance(x0, Tensor) else tuple(x0) if isinstance(x0, (tuple, list)) else ()
    per_sample = per_sample is not False  # None (fixed_point's default) and True: a batch dimension
    if not per_sample or not states or not all(isinstance(s, Tensor) and s.is_floating_point() and s.dim() > 0
                                               for s in states):
        return None, ("only floating-point tensor states with a batch dimension (per_sample not False) are traced",)
    owner, rest = _owner(f)
    try:
        state = python_state(f)
    except StateTooLarge as exc:
        return None, (f"{exc}; the trace cache watches at most {MAX_ITEMS} (pass big objects as arguments)",)
    signature = _signature(x0, args, batched, per_sample, state)
    if signature is None:
        return None, ("an argument that is neither a tensor nor hashable",)
    try:
        table = _CACHE.setdefault(owner, {})
    except TypeError:
        return None, (f"{type(owner).__name__} cannot be referenced weakly (the trace cache is weak)",)
    key = (rest, signature)
    if key not in table and len(table) >= MAX_TRACES:
        return None, (f"this map was traced for {MAX_TRACES} signatures already (a Python value of it that changes at "
                      "every call, a new batch size at every call?)",)
    for _ in range(2):
        entry = table.get(key)
        if entry is None or not _fresh(entry):
            if torch._C._are_functorch_transforms_active():
                # a trace runs f on examples (and draws a random start, which vmap refuses): not inside a transform,
                # whose failure would stay in the cache for the plain calls too; a trace made outside one serves here
                return None, ("not traced inside a torch.func transform (vmap, grad, jvp...); a trace made at a "
                              "call outside one is used inside them",)
            with _TRACE_LOCK:
                entry = table.get(key)
                if entry is None or not _fresh(entry):  # not traced by another thread meanwhile
                    entry = table[key] = _trace(f, x0, args, batched)
        if entry.traced is None:
            return entry, ()
        try:
            params = entry.traced.tensors(owner if isinstance(owner, nn.Module) else None)
        except AttributeError:  # a submodule or parameter was removed
            params = None
        if params is not None and all(shape is None or (isinstance(p, Tensor) and p.shape == shape)
                                      for p, shape in zip(params, entry.traced.shapes)):
            return entry, params
        del table[key]  # the module changed: trace it again
    return None, ("the map's module changes at every call",)


def trace_status(f: Callable, x0: Any, *args: Any, batched: Sequence[bool] | None = None,
                 per_sample: bool | None = None) -> tuple[TracedMap | None, str]:
    """What ``fixed_point(f, x0, *args)`` does with the trace: the :class:`~fpidsl.tracing.api.TracedMap` it solves
    with, or None, and a sentence saying why (traces ``f`` if the cache has no entry yet)."""
    entry, more = _entry(f, x0, args, batched, per_sample)
    if entry is None:
        return None, f"not traced: {more[0]}"
    if entry.traced is None:
        return None, f"not traced: {entry.reason}"
    layer = entry.traced.layer
    batch = {True: "samplewise", False: "samples solved jointly", None: "samples probed (fpidsl.runtime.mixing)"}[
        _per_sample(layer)]
    return entry.traced, (f"traced: layer {layer.__name__}, {batch}"
                          f", {'hoisted' if layer.HOIST_BATCHED is not None else 'nothing hoisted'}")


def _per_sample(layer: type) -> bool | None:
    """True: the traced layer is samplewise; False: it mixes samples; None: not known from the trace, because a
    map that reads no batched argument is traced with the states' sizes ([3, 2]: no named batch) or because it has
    externs (declared mixing): fixed_point probes ``f`` (:mod:`fpidsl.runtime.mixing`)."""
    if layer.SAMPLEWISE:
        return True
    named = all(shape and isinstance(shape[0], str) for shape in layer.STATES.values())
    return None if layer.EXTERNS or not named else False


def traced_plan(f: Callable, x0: Any, args: Sequence[Any], batched: Sequence[bool] | None,
                per_sample: bool) -> Plan | None:
    """The compiled form of ``f`` for ``fixed_point(f, x0, *args)``, or None (use ``f``); see the module's doc."""
    entry, params = _entry(f, x0, args, batched, per_sample)
    if entry is None or entry.traced is None:
        return None
    traced = entry.traced
    layer = traced.layer
    inputs = traced.arguments(args)
    if not layer.SAMPLEWISE:  # a map that mixes samples: no sample is judged, frozen or dropped alone (a frozen
        flags = None          # sample's neighbours moved on, and it came back at a point that was not fixed)
    elif batched is not None:
        flags = (*(batched[i] for i in traced.inputs), *([False] * len(params)))
    else:
        flags = (*traced.spec.batched, *([False] * len(params)))
    hoisted = None if layer.HOIST_BATCHED is None else Hoisted(layer.hoist, layer.iterate, tuple(layer.HOIST_BATCHED))
    return Plan(layer.step, (*inputs, *params), layer.adjoint, hoisted, flags, _per_sample(layer), entry.hooked)


register_trace_planner(traced_plan)  # fixed_point(trace=True) asks it from now on (fpidsl.runtime.fixed_point)
