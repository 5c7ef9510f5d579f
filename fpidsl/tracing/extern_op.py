"""An operation of a traced map that has no primitive, as the module an ``extern`` param is given.

The writer declares ``param NAME : extern [..] -> [..]`` for such an operation (a module call, a torch function,
a tensor method) and the layer calls it on the operation's tensor arguments; :class:`TracedOp` is that module: it
puts the tensors back among the operation's other (fixed) arguments and runs it. Its derivatives are autograd's,
through the extern primitive (``extern_vjp``: ``torch.autograd.grad`` with ``create_graph=True``), to every order.
Those VJPs run the operation again, on clones of its module's buffers (``ExternHandle.apply(replay=True)``), so
that a module in training mode (``BatchNorm``'s running statistics) is updated by the map's evaluations only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Slot:
    """Where the ``index``-th tensor argument of the extern goes in the operation's arguments. ``dtype``: the dtype
    the operation was given it in (a bool mask or an integer count that the layer holds as 0/1 or integer-valued
    floats, ``x > 0`` or ``(x > 0).sum(1)``), to which it is cast back; None: as the layer passes it."""

    index: int
    dtype: torch.dtype | None = None


def _fill(template: Any, tensors: tuple) -> Any:
    if isinstance(template, Slot):
        t = tensors[template.index]
        if template.dtype is None or t.dtype == template.dtype:
            return t
        return t != 0 if template.dtype == torch.bool else t.to(template.dtype)
    if isinstance(template, (list, tuple)):
        return type(template)(_fill(t, tensors) for t in template)
    if isinstance(template, dict):
        return {k: _fill(v, tensors) for k, v in template.items()}
    return template


def _text(value: Any) -> str:
    if isinstance(value, Slot):
        return f"#{value.index}" + ("" if value.dtype is None else f" (as {str(value.dtype).removeprefix('torch.')})")
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_text(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


@dataclass(frozen=True)
class OpCall:
    """An fx call with its tensor arguments as :class:`Slot` s: ``kind`` is ``module`` (the module at ``target`` in
    the traced map), ``function`` (``target`` is the function) or ``method`` (``target`` is its name). ``item``:
    for an operation that returns a tuple, the element the extern gives (``torch.split(#0, 2)[1]``), else None.
    ``mask``: the operation returns a bool tensor, which the layer gets as a 0/1 mask (as it holds a comparison)."""

    kind: str
    target: Any
    args: tuple
    kwargs: dict
    item: int | None = None
    mask: bool = False

    def describe(self) -> str:
        """``torch.cumsum(#0, dim=1)``: the operation with its fixed arguments (``#i``: the extern's tensor i)."""
        item = "" if self.item is None else f"[{self.item}]"
        if self.kind == "module":
            return f"the module {self.target}" + ("" if self.item is None else f" (element {self.item} of its result)")
        args = [_text(a) for a in self.args] + [f"{k}={_text(v)}" for k, v in self.kwargs.items()]
        if self.kind == "method":
            return f"{args[0]}.{self.target}({', '.join(args[1:])}){item}"
        module = getattr(self.target, "__module__", None) or ""
        name = getattr(self.target, "__name__", str(self.target))
        prefix = module + '.' if module and module not in ('builtins', '_operator') else ''
        return f"{prefix}{name}({', '.join(args)}){item}"


class TracedOp(nn.Module):
    """The operation ``call`` applied to the extern's tensor arguments; ``module`` is the traced map's own module
    for a module call (a submodule here, so its parameters are the extern's)."""

    def __init__(self, call: OpCall, module: nn.Module | None = None):
        super().__init__()
        self.call = call
        self.op = module

    def forward(self, *tensors: Tensor) -> Tensor:
        result = self._run(*tensors)
        result = result if self.call.item is None else result[self.call.item]
        if self.call.mask and isinstance(result, Tensor) and result.dtype == torch.bool:
            like = next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())
            result = result.to(like)  # the layer's 0/1 mask, in its arguments' float dtype (as its comparisons)
        return result

    def _run(self, *tensors: Tensor) -> Any:
        args, kwargs = _fill(self.call.args, tensors), _fill(self.call.kwargs, tensors)
        if self.call.kind == "module":
            return self.op(*args, **kwargs)
        if self.call.kind == "method":
            return getattr(args[0], self.call.target)(*args[1:], **kwargs)
        fn: Callable = self.call.target
        return fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return self.call.describe()
