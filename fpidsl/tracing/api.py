"""``fpidsl.trace``: a PyTorch map ``g(x, *args)`` compiled as a layer through the normal pipeline.

``torch.fx`` traces the map (:mod:`~fpidsl.tracing.fx_capture`), :mod:`~fpidsl.tracing.writer` writes the graph as
an ``.fpi`` layer, and that text goes through the compiler like any spec (check, lower, emit, load): the traced
layer gets the derived straight-line backward, the hoisting and the narrowing of a hand-written spec, and its
spec can be written out (``fpidsl trace``) and compiled again to the same layer.

The traced layer's weights. The compiled class declares the map's tensors as its own params (an ``nn.Linear``
submodule is a ``Linear`` param, any other tensor a ``tensor`` param), so ``Layer()`` starts from fresh weights
like any compiled spec; ``Layer.from_module(module)`` copies the traced module's tensors into the layer, and
``Layer.from_module(module, share=True)`` makes the layer's params *the same tensors* (training either trains
both); a tensor that the module holds under two names (tied weights) is one tensor of the layer either way.
``fpidsl.fixed_point`` uses neither: it calls the compiled map with the module's own tensors, read at every call
(:mod:`~fpidsl.tracing.auto`).

The trace evaluates the map (the records, the check): its modules' buffers are put back afterwards, so a module in
training mode (``BatchNorm``'s running statistics) is updated only by the evaluations that ``fixed_point`` makes.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

import weakref

from ..runtime.buffers import kept_buffers, modules_of
from .fx_capture import UntraceableError, capture, one_more_sample, record, resolve
from .writer import WrittenSpec, Writer


@dataclass(frozen=True, eq=False)
class TracedMap:
    """A traced map: its spec, the compiled layer class, and how the map's tensors reach the layer.

    ``inputs``: the positions (among ``args``) of the tensor arguments, which are the layer's inputs in order
    (the other arguments are fixed to their example values); ``params``: per tensor of the layer's
    ``parameter_tensors()``, its dotted name in the traced module, or under a name of ``foreign``: the modules
    and tensors that the map reads without owning them (a function's closure, a global); ``root``: a weak
    reference to the traced module (None for a function)."""

    spec: WrittenSpec
    layer: type
    inputs: tuple[int, ...]
    params: tuple[str, ...]
    foreign: dict[str, Any]
    shapes: tuple[torch.Size, ...]  # of each param tensor at the trace
    root: Any = None

    def tensors(self, module: nn.Module | None = None) -> tuple[Any, ...]:
        """The layer's parameter arguments as they are now, read from ``module`` (default: the traced module): each
        tensor, and for an extern its handle and its parameters as one vector (:mod:`fpidsl.runtime.extern`)."""
        from ..runtime.extern import ExternHandle, extern_parameters

        module = self._module(module)
        ops = {name: self.extern_module(name, module) for name in self.spec.externs}
        out: list[Any] = []
        for p in self.params:
            if p.startswith("extern:"):
                _, name, role = p.split(":")
                out.append(ExternHandle(ops[name], name, self.layer.EXTERNS[name][0], {}) if role == "module"
                           else extern_parameters(ops[name]))
            else:
                out.append(resolve(module, self.foreign, p))
        return tuple(out)

    def extern_module(self, name: str, module: nn.Module | None = None, copy: bool = False,
                      memo: dict | None = None) -> nn.Module:
        """The module to give the layer as its extern ``name``: the operation, on the module's own submodule for a
        module call (a copy with ``copy=True``; ``memo``: ``copy.deepcopy``'s, shared by copies that keep ties)."""
        import copy as _copy

        from .extern_op import TracedOp

        call = self.spec.externs[name]
        if call.kind != "module":
            return TracedOp(call)
        sub = resolve(self._module(module), self.foreign, call.target)
        return TracedOp(call, _copy.deepcopy(sub, memo) if copy else sub)

    def _module(self, module: nn.Module | None) -> nn.Module | None:
        if module is None and self.root is not None:
            module = self.root()
            if module is None:
                raise ValueError("the traced module no longer exists; pass the module to read the tensors from")
        return module

    def arguments(self, args: Sequence[Any]) -> tuple[Tensor, ...]:
        """The layer's inputs among a call's arguments."""
        return tuple(args[i] for i in self.inputs)


def _parameter_order(spec: WrittenSpec) -> list[str]:
    """The layer's params (``fc.weight``, ``w``) in the order its ``step`` takes them."""
    from ..compiler import check_source
    from ..source import Source

    return list(check_source(Source(f"{spec.name}.fpi", spec.text)).graphs[spec.name].params)


def _compiled_class(spec: WrittenSpec) -> type:
    from ..errors import FpiError, FpiErrors
    from ..loader import load_source
    from ..source import Source

    try:
        return load_source(Source(f"{spec.name}.fpi", spec.text)).LAYERS[spec.name]
    except (FpiError, FpiErrors) as exc:
        raise UntraceableError(f"the traced spec does not check ({exc}); the spec was:\n{spec.text}") from None


def default_batched(x: Tensor, args: Sequence[Any]) -> list[bool]:
    """Per argument: a tensor whose dimension 0 has the batch size of ``x`` is batched."""
    n = x.shape[0]
    return [isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n for a in args]


def trace_map(f: Callable, x: Tensor, args: Sequence[Any], batched: Sequence[bool] | None = None,
              name: str | None = None, check: bool = True, externs: bool = True) -> TracedMap:
    """Trace ``f(x, *args)`` into a compiled layer (see :func:`trace`); raises :class:`UntraceableError`.
    ``externs=False``: an operation with no primitive is refused instead of becoming an extern."""
    states = (x,) if isinstance(x, Tensor) else tuple(x) if isinstance(x, (tuple, list)) else ()
    if not states or not all(isinstance(s, Tensor) and s.dim() > 0 and s.is_floating_point() for s in states):
        raise UntraceableError("the state must be a floating-point tensor with a batch dimension, or a tuple of them")
    if len({s.shape[0] for s in states}) != 1:
        raise UntraceableError("the states have different batch sizes (dimension 0)")
    args = list(args)
    flags = default_batched(states[0], args) if batched is None else list(batched)
    if len(flags) != len(args):
        raise UntraceableError(f"batched has {len(flags)} entries for {len(args)} arguments")
    module = capture(f, [x, *args])
    with kept_buffers(modules_of(f, *module.meta["foreign"].values())):
        return _traced(f, module, states, x, args, flags, name, check, externs)


def _traced(f: Callable, module: Any, states: tuple, x: Any, args: list, flags: list, name: str | None,
            check: bool, externs: bool) -> TracedMap:
    """:func:`trace_map` once ``f`` is captured as ``module``: record, write, compile and check."""
    example = [x, *args]
    try:
        first = record(module, example)
    except Exception as exc:
        raise UntraceableError(f"the traced graph fails on the example ({type(exc).__name__}: {exc})") from None
    _check_result(first[next(n for n in module.graph.nodes if n.op == "output")], x)
    # The batch is the symbol B when an input has it (a layer binds B from its inputs); it stays a number when no
    # input has it, or when a tensor with the batch is no argument (a closure's z)
    second, symbolic_batch = first, any(b and isinstance(a, Tensor) for a, b in zip(args, flags))
    if symbolic_batch:
        try:
            second = record(module, one_more_sample(example, [True, *flags]))
        except Exception:
            second, symbolic_batch = first, False
    third = None
    if symbolic_batch and _reads_sizes(module, first):
        # a Python value computed from the sizes (x.shape[0] // 2) is taken as a * B + b from the two records:
        # a third, at batch 2n + 1, shows one that is no such rule (4 // 2 == 5 // 2, and 9 // 2 == 4)
        try:
            third = record(module, one_more_sample(example, [True, *flags], states[0].shape[0] + 1))
        except Exception:
            second, third, symbolic_batch = first, None, False
    if not symbolic_batch:
        flags = [False] * len(flags)
    tensor_flags = [symbolic_batch] * len(states) + [b for a, b in zip(args, flags) if isinstance(a, Tensor)]
    layer_name = name or (type(f).__name__ if isinstance(f, nn.Module) else getattr(f, "__name__", "Traced"))
    layer_name = "Traced" if layer_name == "<lambda>" else layer_name
    spec = Writer(module, first, second, states[0].shape[0], tensor_flags, _layer_name(layer_name), externs,
                  len(states), _labels(f, module.meta["foreign"]), _definition(f), third).write()
    base = _compiled_class(spec)
    order = _parameter_order(spec)
    foreign = module.meta["foreign"]
    traced_ref: list[TracedMap] = []
    traced = TracedMap(spec, _traced_class(base, traced_ref),
                       tuple(i for i, a in enumerate(args) if isinstance(a, Tensor)),
                       tuple(spec.sources[q] for q in order), foreign,
                       tuple(None if spec.sources[q].startswith("extern:")
                             else resolve(module, foreign, spec.sources[q]).shape for q in order),
                       weakref.ref(f) if isinstance(f, nn.Module) else None)
    traced_ref.append(traced)
    if check:
        check_agrees(traced, f, x, args)
    return traced


def _reads_sizes(module: Any, values: dict) -> bool:
    """The graph computes a Python value (a size, ``x.shape[0] // 2``), not only tensors."""
    return any(n.op in ("call_function", "call_method") and not isinstance(values.get(n), Tensor)
               and not (isinstance(values.get(n), (tuple, list)) and any(isinstance(v, Tensor) for v in values[n]))
               for n in module.graph.nodes)


def _definition(f: Callable) -> str | None:
    """``file:line`` of the map's definition (a module's ``forward``, a function's ``def``), None when Python
    cannot tell (a builtin, a callable object without code)."""
    fn = f.forward if isinstance(f, nn.Module) else f
    code = getattr(inspect.unwrap(getattr(fn, "__func__", fn)), "__code__", None)
    if code is None and callable(fn):  # an object with __call__
        code = getattr(getattr(type(fn), "__call__", None), "__code__", None)
    return None if code is None else f"{code.co_filename}:{code.co_firstlineno}"


def _labels(f: Callable, foreign: dict[str, Any]) -> dict[str, str]:
    """The names a function's code gives what it reads without owning it (closure variables, globals)."""
    fn = getattr(f, "__func__", f)
    code = getattr(fn, "__code__", None)
    if code is None:
        return {}
    seen: dict[int, str] = {}
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        try:
            seen.setdefault(id(cell.cell_contents), name)
        except ValueError:  # an empty cell
            pass
    for name in code.co_names:
        if name in fn.__globals__:
            seen.setdefault(id(fn.__globals__[name]), name)
    return {key: seen[id(value)] for key, value in foreign.items() if id(value) in seen}


def _shapes(value: Any) -> str:
    """Shapes (and dtypes) as a user reads them: ``[2, 3] (float32)``, ``([2, 3] (float32), [2] (int64))``."""
    if isinstance(value, Tensor):
        return f"{list(value.shape)} ({str(value.dtype).removeprefix('torch.')})"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shapes(v) for v in value) + ")"
    return type(value).__name__


def _check_result(result: Any, x: Any) -> None:
    """The map returns the structure, shapes and kind of number of its state: floating point (``UntraceableError``
    otherwise)."""
    def like(r: Any, s: Tensor) -> bool:
        return isinstance(r, Tensor) and r.shape == s.shape and r.is_floating_point() == s.is_floating_point()

    if isinstance(x, Tensor):
        ok = like(result, x)
    else:
        ok = isinstance(result, (tuple, list)) and len(result) == len(x) and all(map(like, result, x))
    if not ok:
        raise UntraceableError(f"the map returns {_shapes(result)} for a state of {_shapes(x)}: it must return the "
                               "new state (its structure and shapes, in floating point)")


def _layer_name(wanted: str) -> str:
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in wanted).strip("_")
    return name if name and not name[0].isdigit() else f"Traced{name}"


def _traced_class(base: type, traced_ref: list) -> type:
    """A subclass of the compiled class that knows its trace (two maps with the same spec share ``base``)."""

    def from_module(cls, module: nn.Module | None = None, *, share: bool = False, **options: Any):
        """A layer with the traced map's tensors: copies (default) or, with ``share=True``, the same tensors (a
        tensor that is not an ``nn.Parameter`` becomes a buffer). ``module``: where to read them (default: the
        traced module); ``options``: the layer's constructor options (``solve=``, ``backward=`` ...)."""
        traced = cls.TRACED
        copies: dict = {}  # copy mode: deepcopy's memo, by id of the module's tensor: a tie stays one tensor
        externs = {name: traced.extern_module(name, module, copy=not share, memo=copies)
                   for name in traced.spec.externs}
        layer = cls(**externs, **options)
        for qualified, tensor in zip(_parameter_order(traced.spec), traced.tensors(module)):
            if qualified.split(".")[0] not in externs:
                _put(layer, qualified, tensor, share, copies)
        return layer

    cls = type(base.__name__, (base,), {"__module__": base.__module__, "__doc__": base.__doc__,
                                        "__qualname__": base.__qualname__, "from_module": classmethod(from_module),
                                        "TRACED": _TracedAttribute(traced_ref)})
    cls._fpidsl_spec = base._fpidsl_spec  # instances pickle as the compiled class (loader._reduce_ex)
    return cls


class _TracedAttribute:
    """The class attribute ``TRACED``: the :class:`TracedMap` (made after the class)."""

    def __init__(self, ref: list):
        self.ref = ref

    def __get__(self, obj, owner) -> TracedMap:
        return self.ref[0]


def _put(layer: nn.Module, qualified: str, tensor: Tensor, share: bool, copies: dict) -> None:
    """The layer's param ``qualified`` set to the module's ``tensor``: the tensor itself with ``share`` (a buffer
    where it is no ``nn.Parameter``), else its copy in ``copies`` (made on its first name, so tied names share it)."""
    owner_path, _, leaf = qualified.rpartition(".")
    owner = layer.get_submodule(owner_path) if owner_path else layer
    if share and isinstance(tensor, nn.Parameter):
        setattr(owner, leaf, tensor)
        return
    if not share:
        if id(tensor) not in copies:
            copies[id(tensor)] = nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad)
            copies.setdefault(id(copies), []).append(tensor)  # deepcopy's keep-alive list: the id stays this tensor's
        setattr(owner, leaf, copies[id(tensor)])
        return
    del owner._parameters[leaf]
    owner.register_buffer(leaf, tensor)


def agreement_tolerance(dtype: torch.dtype) -> float:
    """How far the compiled map may be from ``f`` (relative to the output's scale): the square root of the dtype's
    precision, far below what a different branch of the map would give."""
    return math.sqrt(torch.finfo(dtype).eps)


def check_agrees(traced: TracedMap, f: Callable, x: Tensor, args: Sequence[Any], root: nn.Module | None = None) -> None:
    """The compiled map gives ``f``'s numbers at ``x``, at a perturbed ``x``, at a perturbed ``x`` with its
    floating-point tensor arguments perturbed too, and at ``f(x)``, the solver's first iterate (the last two where
    ``f`` gives finite numbers there), else :class:`UntraceableError` (fx records one path through the map: a branch
    on the tensors' values, or a side effect, is not in the graph; an argument of zeros at the example can hide an
    effect the graph lost, such as an in-place change of a shared value; the first iterate is at the scale of the
    arguments, where ``x0 = 0`` and its perturbation may cross no threshold of the map, ``x > 2.5``). The modules'
    buffers are as before afterwards."""
    params = traced.tensors(root)
    single = isinstance(x, Tensor)
    modules = modules_of(f, traced._module(root), *traced.foreign.values())
    with torch.no_grad(), torch.random.fork_rng(devices=[]), kept_buffers(modules):
        torch.manual_seed(0)
        states = (x,) if single else tuple(x)
        perturbed = tuple(_perturbed(s) for s in states)
        moved = tuple(_perturbed(a) if isinstance(a, Tensor) and a.is_floating_point() and a.layout == torch.strided
                      else a for a in args)
        points = [(states, args, True), (perturbed, args, True)]
        if any(m is not a for m, a in zip(moved, args)):
            points.append((perturbed, moved, False))
        for point, values, required in points:
            try:
                want = f(point[0] if single else type(x)(point), *values)
            except Exception as exc:  # noqa: BLE001 - the map refuses perturbed arguments (a domain check)
                if point is states:
                    raise  # the example itself: the solve meets it too
                if required:  # the perturbed state: the trace cannot be checked there, so it is not used
                    raise UntraceableError(
                        f"the map raised at the trace check's perturbed state ({type(exc).__name__}: {exc}), "
                        "where the traced map is compared with it (a lookup table, a factorization out of its "
                        "domain)") from exc
                continue
            _check_result(want, x)
            if point is states:  # the first iterate, checked last (not required: None)
                points.append(((want,) if single else tuple(want), args, None))
            if not required and not all(bool(torch.isfinite(w).all()) for w in ((want,) if single else want)):
                continue  # the perturbed arguments leave the map's domain (a log of a negative number)
            try:
                got = traced.layer.step(point[0] if single else tuple(point), *traced.arguments(values), *params)
            except Exception as exc:  # noqa: BLE001 - only where the map itself gave numbers
                if required is not None:
                    raise
                raise UntraceableError(f"the traced map raised at the map's first iterate f(x0), where the map "
                                       f"gives numbers ({type(exc).__name__}: {exc})") from exc
            for w, g in zip((want,) if single else want, (got,) if single else got):
                tol = agreement_tolerance(w.dtype) * (1 + float(w.abs().max()))
                if not torch.allclose(g, w, rtol=0, atol=tol):
                    err = float((g - w).abs().max())
                    raise UntraceableError(
                        f"the traced map differs from the map by {err:.3g} (tolerance {tol:.3g}): the map does "
                        "something torch.fx does not record (a branch on a tensor's values, a side effect, randomness)")


def _perturbed(t: Tensor) -> Tensor:
    return t + torch.randn_like(t) * (t.abs().mean() + 1)


def trace(f: Callable, example_x: Tensor, *example_args: Any, batched: Sequence[bool] | None = None,
          name: str | None = None) -> type:
    """The compiled layer class of the PyTorch map ``f(x, *args)``, traced with ``torch.fx`` at an example.

    Args:
        f: an ``nn.Module`` or a function ``f(x, *args)`` returning the new state (a tensor shaped like ``x``; with
            several states ``x`` is a tuple and ``f`` returns one). Its
            operations must be in the primitive table (docs/TRACE.md lists what maps onto it): standard modules
            (``nn.Linear``, ``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.GroupNorm``, ``nn.LayerNorm``, activation
            modules), ``torch`` / ``torch.nn.functional`` functions, tensor methods and operators.
        example_x: the state at the example (a tensor or a tuple of tensors); dimension 0 is the batch, the symbol
            ``B`` of the layer (a number when no tensor argument has the batch).
        *example_args: the other arguments at the example. Tensors become the layer's inputs, in order; other
            values are fixed to what they are here.
        batched: one flag per argument: whether its dimension 0 is the batch (default: a tensor whose dimension
            0 has the size of ``example_x``'s).
        name: the layer's name (default: the module's class name or the function's name).

    Returns:
        A :class:`~fpidsl.runtime.layer.CompiledLayer` subclass: ``Layer()`` has fresh weights,
        ``Layer.from_module(module)`` copies the traced module's, ``Layer.from_module(module, share=True)`` uses
        the same tensors. Called as ``layer(*tensor_args)`` it returns the fixed point from ``x0 = 0``.
        ``Layer.TRACED.spec.text`` is the layer's ``.fpi`` text (what ``fpidsl trace`` writes).

    Raises:
        UntraceableError: torch.fx cannot trace ``f``, it uses an operation with no primitive (the message names
        it and where it is written), or the compiled map does not give ``f``'s numbers at the example.
    """
    return trace_map(f, example_x, example_args, batched, name).layer
