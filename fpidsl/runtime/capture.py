"""The tensors a fixed-point map reads besides its arguments, found and made explicit.

``fixed_point(f, x0, *args)`` differentiates with respect to its explicit arguments: the backward evaluates
``f`` with every argument replaced by an independent variable (a partial derivative). A tensor that ``f``
reads some other way (a closure, a module's parameter, a ``functools.partial`` argument, a global) would get
no gradient, silently. This module finds such tensors before the solve and says how to substitute a value
for each of them during one call of ``f``, so the runtime can treat them as extra arguments: they get their
exact gradient, to every order, like any argument.

Found (:func:`discover`), recursively through whatever of these ``f`` is made of:

- an ``nn.Module``: its parameters and buffers (nested modules included), tensor attributes, and what the
  ``forward`` of each of its (user-defined) module classes reads;
- a bound method: its object (a module, or any object with tensor attributes) and its function;
- ``functools.partial``: its function, positional and keyword arguments;
- a Python function: closure cells, default arguments, and the globals its code names;
- any other callable object: its tensor attributes and its ``__call__``;
- a list or a dict found in any of these (up to ``MAX_CONTAINER`` entries): its entries.

Only tensors that vary are collected (:func:`varies`): of floating or complex dtype, those that require grad or
carry a forward-mode tangent; of any dtype, those a ``torch.func`` transform wraps (a vmapped index tensor in a
closure must be sliced like the rest). What cannot be
found this way (a tensor inside a tuple, an attribute of an object reached only at run time) is caught by
:func:`check_complete` after the solve: it evaluates ``f`` once at the fixed point with every known tensor
replaced by a fresh leaf and walks the recorded graph; any other leaf that requires grad raises
:class:`HiddenTensorError` before a result is returned.

The same walk keeps the tensors found that do not vary (``Captured.constants``: a closure constant, a buffer, a
frozen parameter, a dict entry): the backward evaluates ``f`` again where it reads them, and autograd, which did not
save them, cannot see an edit in place between the forward and the backward. :class:`VersionGuard` records their
version counters after the forward and raises at the backward for one edited (or replaced) since, like autograd for
a saved tensor, instead of a gradient of another map.

Substitution swaps values in place for the duration of one call (module parameters through
``torch.nn.utils.stateless``, cell contents, dictionary entries, partial arguments) and restores them after,
also on error. Substituting, discovering and evaluating a map whose tensors were captured hold one lock of the
process (:data:`LOCK`, reentrant): without it two threads calling the same module at once put each other's
detached values back as the originals on leaving, and the module kept plain tensors in place of its parameters
(their gradients silently lost, in every later call too), or discovered another thread's substitutes as its
parameters (their gradients missing). Evaluations of such maps by different threads therefore run one at a time.
"""
from __future__ import annotations

import functools
import threading
import types
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.stateless import _reparametrize_module
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode

MAX_DEPTH = 12
MAX_CONTAINER = 1000  # lists and dicts longer than this are not searched
_LIBRARY_PREFIXES = ("torch", "fpidsl.runtime", "numpy", "builtins", "functools", "math", "typing")
# held while captured values are substituted, discovered or read by an evaluation (see the module's doc)
LOCK = threading.RLock()


class HiddenTensorError(ValueError):
    """``f`` reads a tensor that requires grad and that the runtime could not make an argument of."""


def wants_grad(value: Any) -> bool:
    """A tensor that autograd differentiates with respect to."""
    return (isinstance(value, Tensor) and value.requires_grad
            and (value.is_floating_point() or value.is_complex()))


def varies(value: Any) -> bool:
    """A tensor that a derivative or a batch of the fixed point depends on: one autograd differentiates with
    respect to (:func:`wants_grad`), one that carries a forward-mode tangent (``torch.autograd.forward_ad``), or
    one that a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``) wraps. Read by the map but not an argument,
    the last two would give a tangent without its contribution (silently zero) or a vmap that fails."""
    if not isinstance(value, Tensor):
        return False
    if wants_grad(value) or torch._C._functorch.is_functorch_wrapped_tensor(value):
        return True
    return _has_tangent(value)


def _has_tangent(value: Tensor) -> bool:
    from torch.autograd import forward_ad

    return (forward_ad._current_level >= 0 and (value.is_floating_point() or value.is_complex())
            and forward_ad.unpack_dual(value).tangent is not None)


# ----------------------------------------------------------------------------------------------------------------
# Where a tensor lives, and how to put another value there for a while


@dataclass(frozen=True)
class _ModuleSlot:
    module: nn.Module
    name: str  # dotted name, as named_parameters / named_buffers give it


@dataclass(frozen=True, eq=False)
class _Swap:
    """A location read and written by ``get`` / ``put`` (a cell, a dict entry, an attribute, a partial arg)."""

    get: Callable[[], Any]
    put: Callable[[Any], None]
    where: str

    def swap(self, value: Any) -> Any:
        old = self.get()
        self.put(value)
        return old


def _cell(cell: types.CellType, where: str) -> _Swap:
    def put(v: Any) -> None:
        cell.cell_contents = v

    return _Swap(lambda: cell.cell_contents, put, where)


def _item(mapping: dict, key: Any, where: str) -> _Swap:
    return _Swap(lambda: mapping[key], lambda v: mapping.__setitem__(key, v), where)


def _attr(obj: Any, name: str, where: str) -> _Swap:
    return _Swap(lambda: obj.__dict__[name], lambda v: obj.__dict__.__setitem__(name, v), where)


def _partial_arg(p: functools.partial, index: int, where: str) -> _Swap:
    def put(v: Any) -> None:
        args = list(p.args)
        args[index] = v
        p.__setstate__((p.func, tuple(args), p.keywords, p.__dict__ or None))

    return _Swap(lambda: p.args[index], put, where)


def _defaults(fn: types.FunctionType, index: int, where: str) -> _Swap:
    def put(v: Any) -> None:
        values = list(fn.__defaults__)
        values[index] = v
        fn.__defaults__ = tuple(values)

    return _Swap(lambda: fn.__defaults__[index], put, where)


# ----------------------------------------------------------------------------------------------------------------
# The captured tensors


@dataclass
class Captured:
    """The tensors ``f`` reads besides its arguments (distinct, in the order found) and where each one lives.

    ``module_parameters`` counts the leading tensors that are the parameters of ``f`` itself when ``f`` is an
    ``nn.Module`` (in ``f.parameters()`` order, frozen ones included): the arguments an ``adjoint`` given to
    :func:`~fpidsl.runtime.fixed_point` sees after the user's.
    """

    tensors: list[Tensor] = field(default_factory=list)
    locations: list[list[_ModuleSlot | _Swap]] = field(default_factory=list)
    module_parameters: int = 0
    _index: dict[int, int] = field(default_factory=dict)
    # the other tensors found (ones that do not vary), distinct, and where each one was first found: the backward
    # reads them where they are, so an edit in place between the forward and the backward would change its result
    # (:class:`VersionGuard`)
    constants: list[Tensor] = field(default_factory=list)
    constant_where: list[str] = field(default_factory=list)
    constant_get: list[Callable[[], Any]] = field(default_factory=list)  # what is there now
    _constant_ids: set[int] = field(default_factory=set)
    modules: list[nn.Module] = field(default_factory=list)  # the modules found (their buffers: fixed_point's probe)
    hooked: list[nn.Module] = field(default_factory=list)  # those with a hook-based norm (refresh_hooked_weights)

    def add(self, tensor: Tensor, location: _ModuleSlot | _Swap) -> None:
        i = self._index.get(id(tensor))
        if i is None:
            i = self._index[id(tensor)] = len(self.tensors)
            self.tensors.append(tensor)
            self.locations.append([])
        if location not in self.locations[i]:
            self.locations[i].append(location)

    def add_constant(self, tensor: Tensor, where: str, get: Callable[[], Any]) -> None:
        """A tensor ``f`` reads that does not vary, found where ``get()`` reads (an inference tensor has no version
        counter: left out)."""
        if id(tensor) not in self._constant_ids and id(tensor) not in self._index and not tensor.is_inference():
            self._constant_ids.add(id(tensor))
            self.constants.append(tensor)
            self.constant_where.append(where)
            self.constant_get.append(get)

    def version_guard(self) -> "VersionGuard | None":
        """A guard over :attr:`constants`, None when there are none."""
        if not self.constants:
            return None
        return VersionGuard(self.constants, self.constant_where, self.constant_get)

    def where(self, i: int) -> str:
        loc = self.locations[i][0]
        if isinstance(loc, _ModuleSlot):
            return f"parameter {loc.name!r} of {type(loc.module).__name__}"
        return loc.where

    @contextmanager
    def substituted(self, values: Sequence[Any]) -> Iterator[None]:
        """Within the block, ``f`` reads ``values[i]`` wherever it read ``self.tensors[i]``."""
        if len(values) != len(self.tensors):
            raise ValueError(f"{len(values)} values for {len(self.tensors)} captured tensors")
        with LOCK, ExitStack() as stack:
            per_module: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
            for value, locations in zip(values, self.locations):
                for loc in locations:
                    if isinstance(loc, _ModuleSlot):
                        per_module.setdefault(id(loc.module), (loc.module, {}))[1][loc.name] = value
                    else:
                        old = loc.swap(value)
                        stack.callback(loc.put, old)
            for module, mapping in per_module.values():
                stack.enter_context(_reparametrize_module(module, mapping))
            yield


NOTHING_CAPTURED = Captured()


class VersionGuard:
    """The version counters of the tensors that ``f`` reads besides its arguments and that do not vary (a closure
    constant, a buffer, a frozen parameter, an entry of a dict): the backward evaluates ``f`` again where it reads
    them, so one edited in place between the forward and the backward (``z.add_(1)``) would give the gradient at
    another map, silently (autograd raises for the tensors it saved; these are not saved). :meth:`start` before the
    forward's first evaluation of ``f``, :meth:`mark` after each of its later evaluations (the solve, the capture
    check): a tensor whose version changed meanwhile, or that was replaced where it lives, is one the map writes
    itself (batch norm's statistics in training mode, a module keeping its last input as ``self.last = x``) and
    is no longer watched. :meth:`check` at the backward raises for one edited since."""

    __slots__ = ("tensors", "where", "gets", "versions")

    def __init__(self, tensors: Sequence[Tensor], where: Sequence[str], gets: Sequence[Callable[[], Any]]):
        self.tensors, self.where, self.gets = list(tensors), list(where), list(gets)
        self.versions: list[int] | None = None

    def start(self) -> None:
        if self.versions is None:
            self.versions = [t._version for t in self.tensors]

    def mark(self) -> None:
        if self.versions is None:
            return
        changed = [i for i, (t, v, get) in enumerate(zip(self.tensors, self.versions, self.gets))
                   if t._version != v or not _still_there(t, get)]  # written or rebound by the map itself
        for i in reversed(changed):
            del self.tensors[i], self.where[i], self.gets[i], self.versions[i]

    def keep_only(self, read: set[int]) -> None:
        """Watch only the tensors in ``read`` (ids): those an evaluation of the map took (the walk finds every
        tensor the map's objects hold: a model's batch norm head after the solve, an EMA copy, a logging entry of a
        dict it reads another entry of; their edits change nothing the backward computes)."""
        kept = [i for i, t in enumerate(self.tensors) if id(t) in read]
        self.tensors, self.where, self.gets = ([seq[i] for i in kept] for seq in (self.tensors, self.where,
                                                                                  self.gets))
        if self.versions is not None:
            self.versions = [self.versions[i] for i in kept]

    def check(self) -> None:
        if self.versions is None:
            return
        for t, v, where, get in zip(self.tensors, self.versions, self.where, self.gets):
            if not _still_there(t, get):
                raise RuntimeError(
                    f"{where} ({_describe(t)}), which the fixed-point map reads, was replaced by another value "
                    "between the forward and the backward: the backward evaluates the map again at the fixed point "
                    "and would read the new one, and give the gradient of another map. Put the new value there "
                    "after the backward, or pass the tensor to fixed_point as an argument (fixed_point(f, x0, ..., "
                    "z) with f(x, ..., z)), which autograd saves")
            if t._version != v:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: {where} ({_describe(t)}), which the fixed-point map reads, is at version "
                    f"{t._version}; expected version {v} instead (the one at the end of the forward). The backward "
                    "evaluates the map again at the fixed point: it would read the new value and give the gradient "
                    "of another map. Clone it before editing it in place, and leave the original where the map "
                    "reads it until the backward (z2 = z.clone(); z2.add_(1)), edit it after the backward, or pass "
                    "it to fixed_point as an argument (fixed_point(f, x0, ..., z) with f(x, ..., z)), which autograd "
                    "saves")


def _still_there(t: Tensor, get: Callable[[], Any]) -> bool:
    try:
        return get() is t
    except (AttributeError, KeyError, IndexError, ValueError):  # removed; an emptied cell
        return False


# ----------------------------------------------------------------------------------------------------------------
# Discovery


def _is_library(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.split(".")[0] in _LIBRARY_PREFIXES or module.startswith(_LIBRARY_PREFIXES)


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


NORM_HOOKS = (SpectralNorm, WeightNorm)  # the hook-based norms' forward pre-hooks (torch.nn.utils)


def recomputed_by_hooks(module: nn.Module) -> dict[str, Any]:
    """The attributes of ``module`` that a hook-based weight or spectral norm (``torch.nn.utils.weight_norm`` /
    ``spectral_norm``, forward pre-hooks) computes again from the module's parameters at each of its calls
    (``weight`` from ``weight_g`` and ``weight_v``, or ``weight_orig``), by name, with their hooks. They are not
    tensors the map reads besides its arguments: those parameters are (a ``weight`` left by an earlier call, taken
    as one, made the next backward run into that call's graph)."""
    return {h.name: h for h in module._forward_pre_hooks.values() if isinstance(h, NORM_HOOKS)}


def hooked_modules(roots: Sequence[nn.Module]) -> list[nn.Module]:
    """The modules among ``roots`` and their submodules that have a hook-based weight or spectral norm (the
    discovery walk finds them on the way: :attr:`Captured.hooked`)."""
    found: dict[int, nn.Module] = {}
    for root in roots:
        for m in root.modules():
            if m._forward_pre_hooks and recomputed_by_hooks(m):
                found[id(m)] = m
    return list(found.values())


def refresh_hooked_weights(modules: Sequence[nn.Module]) -> None:
    """Set each attribute of :func:`recomputed_by_hooks` in ``modules`` (:func:`hooked_modules`) to its value from
    the real parameters, as the module's last call in plain PyTorch leaves it: fpidsl's own evaluations of the map
    (the solve, the checks, the backward's) run the hooks on detached copies, and ``weight`` was left detached, or on
    a copy's graph, so code reading ``fc.weight`` after the solve (a tied readout) lost its gradient. The spectral
    norm takes no power iteration here (its vectors are those of the last evaluation)."""
    for m in modules:
        for name, hook in recomputed_by_hooks(m).items():
            setattr(m, name, _spectral_weight(m, hook) if isinstance(hook, SpectralNorm) else hook.compute_weight(m))


def _spectral_weight(module: nn.Module, hook: SpectralNorm) -> Tensor:
    """``SpectralNorm.compute_weight`` without a power iteration, on copies of its vectors ``u`` and ``v``: the next
    call's power iteration writes them in place, and a weight computed from the buffers themselves made a backward
    through it raise "modified by an inplace operation" (torch's hook copies them too)."""
    weight = getattr(module, hook.name + "_orig")
    u = getattr(module, hook.name + "_u").clone(memory_format=torch.contiguous_format)
    v = getattr(module, hook.name + "_v").clone(memory_format=torch.contiguous_format)
    return weight / torch.dot(u, torch.mv(hook.reshape_weight_to_matrix(weight), v))


class _Walker:
    def __init__(self, captured: Captured):
        self.captured = captured
        self.seen: set[int] = set()

    def tensor_or_visit(self, value: Any, location: _Swap, depth: int) -> None:
        if isinstance(value, Tensor):
            if varies(value):
                self.captured.add(value, location)
            else:
                self.captured.add_constant(value, location.where, location.get)
        elif isinstance(value, (list, dict)) and len(value) <= MAX_CONTAINER and id(value) not in self.seen:
            self.container(value, location.where, depth)
        else:
            self.visit(value, depth + 1)

    def container(self, value: list | dict, where: str, depth: int) -> None:
        """A list's or a dict's entries (swapped in place: both are mutable); a tuple cannot be, and is left to
        :func:`check_complete`."""
        self.seen.add(id(value))
        if depth > MAX_DEPTH:
            return
        items = enumerate(value) if isinstance(value, list) else list(value.items())
        for key, item in items:
            self.tensor_or_visit(item, _item(value, key, f"entry {key!r} of {where}"), depth + 1)

    def visit(self, obj: Any, depth: int = 0) -> None:
        if depth > MAX_DEPTH or id(obj) in self.seen or isinstance(obj, (Tensor, type, types.ModuleType)):
            return
        self.seen.add(id(obj))
        if isinstance(obj, nn.Module):
            self.module(obj, depth)
        elif isinstance(obj, functools.partial):
            self.partial(obj, depth)
        elif isinstance(obj, types.MethodType):
            self.visit(obj.__self__, depth + 1)
            self.visit(obj.__func__, depth + 1)
        elif isinstance(obj, types.FunctionType):
            self.function(obj, depth)
        elif callable(obj) and hasattr(obj, "__dict__") and not _is_library(type(obj)):
            self.attributes(obj, type(obj).__name__, depth)
            call = getattr(type(obj), "__call__", None)
            if isinstance(call, types.FunctionType):
                self.visit(call, depth + 1)

    def module(self, module: nn.Module, depth: int) -> None:
        self.captured.modules.append(module)
        for name, p in module.named_parameters(remove_duplicate=False):
            if varies(p):
                self.captured.add(p, _ModuleSlot(module, name))
            else:
                self.captured.add_constant(p, f"parameter {name!r} of {type(module).__name__} (not requiring grad)",
                                           functools.partial(module.get_parameter, name))
        for name, b in module.named_buffers(remove_duplicate=False):
            if varies(b):
                self.captured.add(b, _ModuleSlot(module, name))
            else:
                self.captured.add_constant(b, f"buffer {name!r} of {type(module).__name__}",
                                           functools.partial(module.get_buffer, name))
        for sub_name, sub in module.named_modules(remove_duplicate=True):
            self.seen.add(id(sub))
            owner = type(sub).__name__ + (f" ({sub_name})" if sub_name else "")
            self.attributes(sub, owner, depth)
            forward = getattr(type(sub), "forward", None)
            if isinstance(forward, types.FunctionType) and not _is_library(forward):
                self.visit(forward, depth + 1)

    def attributes(self, obj: Any, owner: str, depth: int) -> None:
        recomputed = recomputed_by_hooks(obj) if isinstance(obj, nn.Module) and obj._forward_pre_hooks else {}
        if recomputed and all(m is not obj for m in self.captured.hooked):
            self.captured.hooked.append(obj)
        for name, value in list(vars(obj).items()):
            if name in recomputed:
                continue
            if isinstance(value, Tensor):
                if varies(value):
                    self.captured.add(value, _attr(obj, name, f"attribute {name!r} of {owner}"))
                else:
                    self.captured.add_constant(value, f"attribute {name!r} of {owner}",
                                               functools.partial(vars(obj).get, name))
            elif isinstance(value, (nn.Module, types.FunctionType, functools.partial, types.MethodType)):
                self.visit(value, depth + 1)
            elif (isinstance(value, (list, dict)) and not name.startswith("_") and len(value) <= MAX_CONTAINER
                  and id(value) not in self.seen):  # not a module's own _parameters, _buffers, hooks
                self.container(value, f"attribute {name!r} of {owner}", depth)

    def partial(self, p: functools.partial, depth: int) -> None:
        self.visit(p.func, depth + 1)
        for i, a in enumerate(p.args):
            self.tensor_or_visit(a, _partial_arg(p, i, f"argument {i} of a functools.partial"), depth)
        for key, a in p.keywords.items():
            self.tensor_or_visit(a, _item(p.keywords, key, f"keyword {key!r} of a functools.partial"), depth)

    def function(self, fn: types.FunctionType, depth: int) -> None:
        if _is_library(fn):
            return
        label = getattr(fn, "__qualname__", fn.__name__)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later)
                continue
            self.tensor_or_visit(value, _cell(cell, f"variable {name!r} captured by {label}"), depth)
        for i, value in enumerate(fn.__defaults__ or ()):
            self.tensor_or_visit(value, _defaults(fn, i, f"default argument {i} of {label}"), depth)
        for key, value in (fn.__kwdefaults__ or {}).items():
            self.tensor_or_visit(value, _item(fn.__kwdefaults__, key, f"default {key!r} of {label}"), depth)
        module_globals = fn.__globals__
        for name in sorted(_code_names(fn.__code__)):
            if name in module_globals:
                self.tensor_or_visit(module_globals[name],
                                     _item(module_globals, name, f"global {name!r} read by {label}"), depth)


def discover(f: Callable) -> Captured:
    """The tensors requiring grad that ``f`` reads besides its arguments (see the module's doc).

    When ``f`` is an ``nn.Module`` its own parameters come first, in ``f.parameters()`` order, frozen ones
    included (the documented arguments of a custom adjoint)."""
    captured = Captured()
    with LOCK:  # not while another thread's substitutes are in place
        if isinstance(f, nn.Module):  # first occurrences in named_parameters order are f.parameters() order
            for name, p in f.named_parameters(remove_duplicate=False):
                captured.add(p, _ModuleSlot(f, name))
            captured.module_parameters = len(captured.tensors)
        _Walker(captured).visit(f)
    return captured


# ----------------------------------------------------------------------------------------------------------------
# The safety net


class _Births(TorchFunctionMode):
    """Remembers every tensor that a torch operation returns while it is active (weakly): a leaf made inside
    the map (``x.detach().requires_grad_()`` for an inner gradient) is the map's own, not a captured tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, weakref.ref] = {}
        self.read: set[int] = set()  # the tensors the operations took (ids): what the map reads (VersionGuard)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for a in (*args, *(kwargs or {}).values()):
            if isinstance(a, Tensor):
                self.read.add(id(a))
            elif isinstance(a, (tuple, list)):
                self.read.update(id(t) for t in a if isinstance(t, Tensor))
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, Tensor):
                self.refs[id(t)] = weakref.ref(t)
        return out

    def made(self, t: Tensor) -> bool:
        ref = self.refs.get(id(t))
        return ref is not None and ref() is t


def _foreign_leaf(outputs: Sequence[Tensor], known: set[int], births: _Births) -> Tensor | None:
    """A leaf requiring grad that the graph of ``outputs`` reaches, not in ``known`` (by id) nor made inside."""
    stack = [t.grad_fn for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None]
    for t in outputs:
        if (isinstance(t, Tensor) and t.requires_grad and t.grad_fn is None and id(t) not in known
                and not births.made(t)):
            return t
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):  # an AccumulateGrad node: a leaf
            if id(variable) not in known and not births.made(variable):
                return variable
            continue
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return None


_HIDDEN_ADVICE = ("(not an argument, nor a parameter, buffer or tensor attribute of a module, closure variable, "
                  "functools.partial argument, default or global that the map is made of)")


def _as_outputs(y: Any) -> tuple:
    return (y,) if isinstance(y, Tensor) else tuple(y)


def _raise_if_tangent(outputs: Sequence[Any]) -> None:
    """Under forward-mode AD: ``fn``'s outputs, from its arguments detached (``detach`` drops a tangent, also
    ``torch.func.jvp``'s), carry a tangent only from a dual tensor ``fn`` reads that is not an argument, whose part
    of the fixed point's tangent would be silently lost."""
    from torch.autograd import forward_ad

    if any(isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in outputs):
        raise HiddenTensorError(
            "the fixed-point map reads a tensor that carries a forward-mode tangent (torch.autograd.forward_ad, "
            f"torch.func.jvp) and that fpidsl cannot reach {_HIDDEN_ADVICE}; the tangent of the fixed point would "
            "leave its part out, silently. Pass it as an argument: fixed_point(f, x0, ..., t) with f(x, ..., t)")


def _raise_if_grad_tracked(outputs: Sequence[Any]) -> None:
    """Under ``torch.func`` (where a map cannot make leaves of its own: ``requires_grad_`` is not allowed there):
    ``fn``'s outputs, from its arguments detached, require grad only from a tensor that ``torch.func.grad`` tracks
    and ``fn`` reads without it being an argument, whose part of the gradient would be silently lost."""
    if any(isinstance(t, Tensor) and t.requires_grad for t in outputs):
        raise HiddenTensorError(
            f"the fixed-point map reads a tensor that requires grad (or that torch.func.grad tracks) and that fpidsl "
            f"cannot reach {_HIDDEN_ADVICE}; its gradient would be silently wrong. Pass it as an argument: "
            "fixed_point(f, x0, ..., t) with f(x, ..., t)")


def _describe(t: Tensor) -> str:
    kind = "an nn.Parameter" if isinstance(t, nn.Parameter) else "a tensor"
    return f"{kind} of shape {list(t.shape)} and dtype {str(t.dtype).replace('torch.', '')}"


def check_complete(fn: Callable[..., Any], x_hat: Sequence[Tensor], args: Sequence[Any],
                   keep: Sequence[nn.Module] = ()) -> None:
    """Raise :class:`HiddenTensorError` if ``fn(x_hat, *args)`` (the pure map: every known tensor an argument)
    reads a tensor other than its arguments that requires grad (grad mode on), that carries a forward-mode tangent
    (forward AD active) or that ``torch.func.grad`` tracks; nothing to check where neither is on. One evaluation
    of ``fn`` at the fixed point in every case, which leaves the buffers of the modules ``keep`` as they were (it is
    not one of the solver's: :mod:`fpidsl.runtime.buffers`)."""
    from torch.autograd import forward_ad

    from .buffers import kept_buffers

    forward = forward_ad._current_level >= 0  # forward-mode AD: torch.autograd.forward_ad, torch.func.jvp
    grad = torch.is_grad_enabled()
    if not (forward or grad):
        return
    births = None
    try:
        with kept_buffers(keep):
            births = _check_evaluation(fn, x_hat, args, forward, grad)
    finally:  # what this evaluation (and its restoring of the buffers) wrote is the map's, not the user's edit
        guard = getattr(fn, "version_guard", None)
        if guard is not None:
            guard.mark()
            if births is not None:  # watch what the map read in it, not all the walk found (a model's head)
                guard.keep_only(births.read)


def _check_evaluation(fn: Callable[..., Any], x_hat: Sequence[Tensor], args: Sequence[Any], forward: bool,
                      grad: bool) -> "_Births | None":
    """:func:`check_complete`'s evaluation and verdict, with forward mode or grad mode on; what the evaluation's
    operations took (with grad mode on, outside torch.func)."""
    from .transforms import is_transformed

    detached = lambda a: a.detach() if isinstance(a, Tensor) else a  # noqa: E731 - no tangent, no graph
    if not grad or is_transformed((*x_hat, *args)):  # torch.func: a tensor that requires grad is one grad tracks
        outputs = _as_outputs(fn(tuple(detached(x) for x in x_hat), *(detached(a) for a in args)))
        if forward:
            _raise_if_tangent(outputs)
        if grad:
            _raise_if_grad_tracked(outputs)
        return None
    with torch.enable_grad():
        leaves = tuple(a.detach().requires_grad_() if wants_grad(a) else detached(a) for a in args)
        with _Births() as births:
            outputs = _as_outputs(fn(tuple(detached(x) for x in x_hat), *leaves))
    if forward:
        _raise_if_tangent(outputs)
    hidden = _foreign_leaf(outputs, {id(a) for a in leaves if isinstance(a, Tensor)}, births)
    if hidden is not None:
        raise HiddenTensorError(
            f"the fixed-point map reads {_describe(hidden)} that requires grad and that fpidsl cannot reach "
            f"{_HIDDEN_ADVICE}; its gradient would be silently wrong. Pass it as an argument: "
            "fixed_point(f, x0, ..., t) with f(x, ..., t)")
    return births
