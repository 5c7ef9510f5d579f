"""A PyTorch map ``g(x, *args)`` as a ``torch.fx`` graph, run at two batch sizes to tell the batch dims apart.

:func:`capture` traces ``g`` symbolically (``torch.fx``). The tracer keeps the standard ``torch.nn`` modules as
leaves (``nn.Linear`` is one ``call_module`` node) and traces through the user's own modules, ``nn.Sequential``
included. A module or a parameter that ``g`` reaches without owning it (a function closing over a model) is
installed in the traced root under a fresh name, so every tensor the graph reads is a ``get_attr`` of it.

The graph is then run (:class:`Recorder`) on the example, and again on the example with one more sample (the
first sample repeated) in every batched argument: a dimension that changes between the two runs is a batch
dimension, ``a * B + b`` (:class:`BatchDim`), and one that does not is a number. That is how a shape written
``x.view(x.shape[0], 4, 4)`` or ``x.reshape(-1, 16)`` becomes ``[B, 4, 4]`` or ``[B, 16]`` in the spec.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import sys
import threading
import types
import warnings
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, fx, nn
from torch.fx._symbolic_trace import PH


class UntraceableError(Exception):
    """The map cannot become a layer graph: torch.fx cannot trace it, or it uses an operation with no primitive
    (the message names the operation and where it is)."""


@dataclass(frozen=True)
class BatchDim:
    """A size that follows the batch: ``scale * B + offset``."""

    scale: int
    offset: int = 0

    @property
    def is_batch(self) -> bool:
        return self.scale == 1 and self.offset == 0


class _Tracer(fx.Tracer):
    """Standard ``torch.nn`` modules as leaves. A module, a parameter or a tensor that the map reaches without
    owning it (a function closing over a model, a global tensor) gets a fresh name in :attr:`foreign` (the
    user's module is never changed): ``get_attr`` and ``call_module`` nodes name either a path in the traced
    root or an entry of ``foreign``."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True  # where the user wrote each node, for messages
        self.foreign: dict[str, Any] = {}
        self._foreign_names: dict[int, str] = {}
        # (target, tensors) as the map met them: a module's parameters and buffers at its call, a tensor it read
        self.seen: list[tuple[str, dict[str, Tensor]]] = []
        self.grad_off: list[fx.Node] = []  # operations the map ran with gradients off (torch.no_grad ...)
        self.augmented: list[tuple[fx.Node, fx.Node]] = []  # (old, new) of each augmented assignment (h += a)

    def _filter_traceback_frames(self, summary: traceback.StackSummary) -> traceback.StackSummary:
        """The user's frames (fx keeps those below a ``forward`` only, which a plain function has not)."""
        return traceback.StackSummary.from_list(
            [f for f in summary if "/torch/" not in f.filename and "/fpidsl/" not in f.filename])

    def _adopt(self, value: Any, stem: str) -> str:
        key = id(value)
        if key not in self._foreign_names:
            name = f"{stem}{len(self._foreign_names)}"
            self.foreign[name] = value
            self._foreign_names[key] = name
        return self._foreign_names[key]

    def _within_foreign(self, value: Any) -> str | None:
        """The path of ``value`` inside a foreign module already adopted (its submodule, parameter or buffer)."""
        for name, owner in self.foreign.items():
            if isinstance(owner, nn.Module):
                members = owner.named_modules() if isinstance(value, nn.Module) else _tensors_of(owner).items()
                for path, member in members:
                    if member is value:
                        return f"{name}.{path}" if path else name
        return None

    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError:
            return self._within_foreign(mod) or self._adopt(mod, "_module")

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if backward_hooked(m):
            raise UntraceableError(f"the module {type(m).__name__} has backward hooks, which a trace would skip")
        if self.is_leaf_module(m, ""):
            self.seen.append((self.path_of_module(m), _tensors_of(m)))
        elif hooked(m):
            raise UntraceableError(f"the module {type(m).__name__} has forward hooks, which a trace would skip")
        return super().call_module(m, forward, args, kwargs)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind in ("call_function", "call_method", "call_module") and not torch.is_grad_enabled():
            self.grad_off.append(node)  # the trace runs under enable_grad: the map turned gradients off here
        return node

    def create_arg(self, a: Any):
        if isinstance(a, Tensor) and not isinstance(a, fx.Proxy):
            owned = (self.root.named_parameters() if isinstance(a, nn.Parameter) else self.root.named_buffers())
            for name, t in owned:
                if t is a:
                    self.seen.append((name, {"": a}))
                    return self.create_node("get_attr", name, (), {})
            name = self.tensor_attrs.get(a) or self._within_foreign(a) or self._adopt(a, "_tensor")
            self.seen.append((name, {"": a}))
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (its own or global ones), which a trace of its ``forward`` or a
    primitive reading its weights would skip (``torch.nn.utils.weight_norm`` recomputes ``weight`` in one)."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_pre_hooks or module._forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_forward_hooks)


def backward_hooked(module: nn.Module) -> bool:
    """Whether ``module`` has backward hooks (its own or global ones): they fire in autograd's backward of the
    module's call, which a compiled layer does not make."""
    from torch.nn.modules import module as torch_module

    return bool(module._backward_hooks or module._backward_pre_hooks or torch_module._global_backward_hooks
                or torch_module._global_backward_pre_hooks)


@contextlib.contextmanager
def _custom_functions_refused() -> Iterator[None]:
    """``torch.autograd.Function.apply`` on a traced value raises :class:`UntraceableError` while this is active:
    fx would record the operations of the Function's ``forward`` and differentiate those, not its ``backward``.
    Calls on other values (a Function applied to constants) run as usual."""
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
            raise UntraceableError(f"the map applies the autograd.Function {cls.__name__}, whose backward a trace "
                                   "of its forward would not follow")
        return original.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original


_SCALAR_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__", "__complex__")


@contextlib.contextmanager
def _scalar_reads_refused() -> Iterator[None]:
    """A Python number (or list, or truth value) read from a real tensor by the map's own code (``t.item()``,
    ``float(t)``, ``if t > 0:``, ``t.tolist()``) raises :class:`UntraceableError` while this is active, in the
    tracing thread: a read of a traced value fails in fx anyway, but one of a global tensor or a plain tensor
    attribute ran once, and the trace kept the number it read, however the tensor changed later (a fixed point 0.41
    from the map's). Reads made by torch's own code (a module's checks) run as usual."""
    tracing = threading.get_ident()
    saved = {name: torch.Tensor.__dict__.get(name) for name in _SCALAR_READS}

    def refusing(name: str, original: Callable) -> Callable:
        def read(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == tracing:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller != "torch" and not caller.startswith(("torch.", "fpidsl.")):
                    raise UntraceableError(
                        f"the map reads a Python value from a tensor (Tensor.{name}: .item(), float(t), int(t), "
                        "if t ..., .tolist()), which a trace would keep fixed at the value read now; pass it as a "
                        "Python number, or compute with the tensor")
            return original(self, *args, **kwargs)

        return read

    for name in _SCALAR_READS:
        setattr(torch.Tensor, name, refusing(name, getattr(torch.Tensor, name)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, value)


# augmented assignment on a traced value (``h += a``): fx has no in-place form and records ``h + a``, rebinding
# ``h``; the eager map changes ``h``'s memory, which its other names and views see
_AUGMENTED = {"__iadd__": operator.add, "__isub__": operator.sub, "__imul__": operator.mul,
              "__itruediv__": operator.truediv, "__ifloordiv__": operator.floordiv, "__imod__": operator.mod,
              "__ipow__": operator.pow, "__imatmul__": operator.matmul, "__iand__": operator.and_,
              "__ior__": operator.or_, "__ixor__": operator.xor, "__ilshift__": operator.lshift,
              "__irshift__": operator.rshift}
# the fx targets whose result shares its input's memory (a view)
_VIEWS = {operator.getitem, "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "expand",
          "expand_as", "narrow", "select", "unsqueeze", "squeeze", "flatten", "unflatten", "t", "T", "mT", "H",
          "as_strided", "unfold", "diagonal", "split", "chunk", "unbind", "movedim", "swapaxes", "swapdims",
          "detach", "real", "imag", "contiguous", torch.transpose, torch.permute, torch.reshape, torch.narrow,
          torch.select, torch.unsqueeze, torch.squeeze, torch.flatten, torch.t, torch.diagonal, torch.split,
          torch.chunk, torch.unbind, torch.movedim, torch.swapaxes, torch.swapdims, torch.detach}


@contextlib.contextmanager
def _augmented_assignments_recorded(tracer: "_Tracer") -> Iterator[None]:
    """While this is active, ``proxy += value`` (and the other augmented assignments) records the out-of-place
    operation and the pair (old node, new node) in ``tracer.augmented``, which :func:`_check_augmented` reads."""
    def recording(target: Callable) -> Callable:
        def augmented(self: fx.Proxy, other: Any) -> fx.Proxy:
            out = self.tracer.create_proxy("call_function", target, (self, other), {})
            tracer.augmented.append((self.node, out.node))
            return out

        return augmented

    for name, target in _AUGMENTED.items():
        setattr(fx.Proxy, name, recording(target))
    try:
        yield
    finally:
        for name in _AUGMENTED:
            delattr(fx.Proxy, name)


def _is_view(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _VIEWS


def _check_augmented(graph: fx.Graph, pairs: list[tuple[fx.Node, fx.Node]]) -> None:
    """Refuse an augmented assignment whose in-place effect the out-of-place graph would lose: on an argument, a
    parameter or a view (the eager map changes the memory it shares), on a value that has views, or on a value
    read again after it (through another name: ``skip = h; h += a; skip`` is the new value in eager)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    for old, new in pairs:
        why = None
        if old.op in ("placeholder", "get_attr"):
            why = "an argument or a tensor of the map's"
        elif _is_view(old):
            why = "a view of another value (a slice, view, reshape, transpose ...)"
        elif any(_is_view(user) for user in old.users):
            why = "a value with a view"
        elif any(order[user] > order[new] for user in old.users if user is not new):
            why = "a value read again after it (another name for it sees the change)"
        if why is not None:
            raise UntraceableError(f"the map changes {why} in place with an augmented assignment "
                                   f"({new.target.__name__} into {old.name}), which a trace (out of place) would not "
                                   "follow; write it out of place (h = h + a)")


def _tensors_of(module: nn.Module) -> dict[str, Tensor]:
    """A module's parameters and buffers by their dotted paths in it."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _swapped(tracer: _Tracer) -> str | None:
    """The first target whose tensors, as the map met them while it ran, are not the ones found there once it has
    returned: the map replaced them for the call (``torch.func.functional_call``, a stateless swap), and a trace
    would read the module's own tensors instead."""
    for target, met in tracer.seen:
        try:
            now = resolve(tracer.root, tracer.foreign, target)
        except AttributeError:
            return target
        found = {"": now} if isinstance(now, Tensor) else _tensors_of(now) if isinstance(now, nn.Module) else {}
        if any(found.get(path) is not tensor for path, tensor in met.items()):
            return target
    return None


def resolve(root: Any, foreign: dict[str, Any], target: str) -> Any:
    """The object at the dotted ``target``: from ``foreign`` when its first part is a foreign name, else in
    ``root``."""
    first, *rest = target.split(".")
    value = foreign[first] if first in foreign else getattr(root, first)
    for part in rest:
        value = getattr(value, part)
    return value


def _signature_names(f: Callable) -> list[str]:
    target = f.forward if isinstance(f, nn.Module) else f
    params = list(inspect.signature(target).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise UntraceableError("the map takes *args or **kwargs; trace one with named arguments")
    return [p.name for p in params]


def capture(f: Callable, example: Sequence[Any]) -> fx.GraphModule:
    """The fx graph of ``f`` called as ``f(*example)``; arguments that are not tensors are fixed to their values."""
    try:
        names = _signature_names(f)
    except (TypeError, ValueError) as exc:
        raise UntraceableError(f"the map's signature cannot be read: {exc}") from None
    if len(names) < len(example):
        raise UntraceableError(f"the map takes {len(names)} arguments, given {len(example)}")
    concrete = {name: value for name, value in zip(names, example) if not isinstance(value, Tensor)}
    if isinstance(example[0], (tuple, list)):  # several states: one placeholder each (x, y = xs works)
        concrete[names[0]] = type(example[0])(PH for _ in example[0])
    root, bound = f, None
    if isinstance(f, types.MethodType):  # fx traces functions: the method's function, its object fixed
        root, bound = f.__func__, next(iter(inspect.signature(f.__func__).parameters))
        concrete[bound] = f.__self__
    if isinstance(f, nn.Module) and (hooked(f) or backward_hooked(f)):
        raise UntraceableError(f"the module {type(f).__name__} has hooks, which a trace would skip")
    tracer = _Tracer()
    try:
        with warnings.catch_warnings(), torch.enable_grad(), _custom_functions_refused(), _scalar_reads_refused(), \
                _augmented_assignments_recorded(tracer):
            warnings.filterwarnings("ignore", message="Was not able to add assertion")  # the cache key holds it
            graph = tracer.trace(root, concrete_args=concrete or None)
        _check_augmented(graph, tracer.augmented)
    except UntraceableError:
        raise
    except Exception as exc:  # fx raises many kinds: TraceError, TypeError (a Proxy in bool()), NameError ...
        raise UntraceableError(f"torch.fx cannot trace the map: {type(exc).__name__}: {exc}") from None
    if tracer.grad_off:
        node = tracer.grad_off[0]
        raise UntraceableError(f"the map computes {node.target if isinstance(node.target, str) else node.name} with "
                               "gradients off (torch.no_grad, set_grad_enabled, inference_mode), which a trace would "
                               "differentiate; use .detach() for a value that takes no gradient")
    swapped = _swapped(tracer)
    if swapped is not None:
        raise UntraceableError(f"the map replaces the tensors of {_shown(swapped, tracer)} while it runs "
                               "(torch.func.functional_call, a stateless swap): a trace would read the module's own "
                               "tensors, not the ones the map passes")
    _drop_specialization_checks(graph)
    for node in list(graph.nodes):  # the object of a method is no argument of the traced map
        if node.op == "placeholder" and bound is not None and node.target.startswith(bound) and not node.users:
            graph.erase_node(node)
    targets = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    attributes = {t: resolve(tracer.root, tracer.foreign, t) for t in targets}
    name = type(f).__name__ if isinstance(f, nn.Module) else getattr(f, "__name__", "map")
    module = fx.GraphModule(attributes, graph, name)
    module.meta["foreign"] = dict(tracer.foreign)  # what f reads without owning it (the other targets are paths in f)
    return module


def _shown(target: str, tracer: _Tracer) -> str:
    """A target as the user knows it: a foreign object's generated name replaced by its type."""
    first, *rest = target.split(".")
    if first in tracer.foreign:
        first = type(tracer.foreign[first]).__name__
    return ".".join([first, *rest])


def _drop_specialization_checks(graph: fx.Graph) -> None:
    """The ``torch._assert`` nodes fx adds for arguments fixed to their values (the cache key holds those values)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch._assert and "specialized" in str(node.args[1:]):
            condition = node.args[0]
            graph.erase_node(node)
            if isinstance(condition, fx.Node) and not condition.users:
                graph.erase_node(condition)


class Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's value."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n] = value
        return value


def record(module: fx.GraphModule, example: Sequence[Any]) -> dict[fx.Node, Any]:
    """Every node's value on ``example`` (the map's arguments, in order), without recording autograd."""
    recorder = Recorder(module)
    with torch.no_grad():
        recorder.run(*example)
    return recorder.values


def one_more_sample(example: Sequence[Any], batched: Sequence[bool], more: int = 1) -> list[Any]:
    """The example with its first ``more`` samples appended to every batched argument (one flag per argument; a
    tuple of states: each), taken again from its start where ``more`` is above the batch size."""
    def extended(t: Any) -> Any:
        if isinstance(t, (tuple, list)):
            return type(t)(extended(s) for s in t)
        if t.shape[0] == 0:
            return t
        return torch.cat([t, *[t] * (more // t.shape[0]), t[:more % t.shape[0]]])

    return [extended(t) if b else t for t, b in zip(example, batched)]


def batch_dim(a: int, b: int, n: int) -> int | BatchDim:
    """A size that is ``a`` at batch ``n`` and ``b`` at batch ``n + 1``: a number, or ``scale * B + offset``."""
    if a == b:
        return a
    scale = b - a
    return BatchDim(scale, a - scale * n)


def symbolic(a: Any, b: Any, n: int) -> Any:
    """A value recorded at batch ``n`` (``a``) and ``n + 1`` (``b``), with its batch-following sizes symbolic:
    a tensor becomes its symbolic shape, an int a :class:`BatchDim` where it moved, a tuple item by item."""
    if isinstance(a, Tensor):
        if a.dim() != b.dim():
            raise UntraceableError("a value changes rank with the batch size")
        return tuple(batch_dim(p, q, n) for p, q in zip(a.shape, b.shape))
    if isinstance(a, float) and not isinstance(a, bool) and a != b and not (a != a and b != b):
        raise UntraceableError(f"a number computed from the batch size ({a!r} at batch {n}, {b!r} at {n + 1}: "
                               "x.shape[0] / 8, say) would be fixed at the example's batch; pass it as an "
                               "argument")
    if isinstance(a, bool) or not isinstance(a, (int, tuple, list, torch.Size)):
        return a
    if isinstance(a, int):
        return batch_dim(a, b, n)
    return tuple(symbolic(p, q, n) for p, q in zip(a, b))
