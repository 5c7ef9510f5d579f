"""Outside modules in compiled layers (``param f : extern [B, C] -> [B, C]``; :mod:`fpidsl.ir.extern`).

The layer holds the user's module as the submodule ``f`` (state_dict, optimizers, ``.to``, pickling as usual) and
passes two arguments for it to ``step`` and the adjoint, in the order of its params: an :class:`ExternHandle`
(the module, the call's symbolic sizes and where the spec declares it; not a tensor, so the fixed-point operator
passes it through as a constant) and :func:`extern_parameters`, the module's parameters flattened into one
vector, so that they are explicit arguments of the fixed point and get exact gradients to every order.

``apply`` runs the module on views of that vector (``torch.func.functional_call``) and checks the result against
the declared output shape; ``vjp`` takes nested VJPs of it by ``torch.autograd.grad(..., create_graph=True)``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .layer import LayerInputError
from .sizes import is_symbol, size, symbols
from .adjoint import forward_tangent
from .torch_faults import norms_with_a_separate_bias
from .transforms import is_transformed


class ExternError(LayerInputError):
    """An extern module that returned something other than its declared output."""


class ExternFunction(nn.Module):
    """Any callable of tensors as a parameter-free module, to be given as an extern (``Layer(f=ExternFunction(fn))``;
    a tracer uses it for functions outside the primitive table)."""

    def __init__(self, fn: Callable[..., Tensor]):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"ExternFunction needs a callable, got {type(fn).__name__}")
        self.fn = fn

    def forward(self, *args: Tensor) -> Tensor:
        return self.fn(*args)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


def _declared(dim: Any, sizes: Mapping[str, int]) -> Any:
    """A declared size's value for the bound symbols (``H/2`` included), or None where a symbol is unbound."""
    if any(s not in sizes for s in symbols(dim)):
        return None
    return size(dim, sizes)


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_module(layer: nn.Module, name: str, module: Any) -> nn.Module:
    """``module``, given to ``layer``'s constructor as its extern ``name``, if it is an ``nn.Module``; a TypeError that
    says what to pass otherwise."""
    where, declared = type(layer).EXTERNS[name]
    cls = type(layer).__name__
    if module is None:
        raise TypeError(f"{cls} ({where}) needs the module {name}, declared `{declared}`: pass it as "
                        f"{cls}({name}=module)")
    if not isinstance(module, nn.Module):
        hint = (f"; wrap a function as fpidsl.runtime.extern.ExternFunction(fn)" if callable(module) else "")
        raise TypeError(f"{cls} ({where}): {name} must be a torch.nn.Module (declared `{declared}`), got "
                        f"{type(module).__name__}{hint}")
    return module


def extern_parameters(module: nn.Module) -> Tensor:
    """The module's parameters flattened into one vector (differentiable: its gradient reaches each of them)."""
    params = [p.reshape(-1) for p in module.parameters()]
    if not params:  # on the device of the module's buffers, where it has any
        buffer = next(module.buffers(), None)
        return torch.zeros(0) if buffer is None else torch.zeros(0, device=buffer.device)
    return torch.cat(params) if len(params) > 1 else params[0]


class ExternHandle:
    """One call's view of an extern: the module, the layer's symbolic sizes at that call, and where the spec
    declares it (for messages). ``apply`` and ``vjp`` are what ``ops.extern`` and ``ops.extern_vjp`` run."""

    def __init__(self, module: nn.Module, name: str, where: str, dims: Mapping[str, int]):
        self.module, self.name, self.where, self.dims = module, name, where, dict(dims)

    def __repr__(self) -> str:
        return f"ExternHandle({self.name}: {type(self.module).__name__})"

    def _views(self, flat: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for key, p in self.module.named_parameters():
            n = p.numel()
            view = flat[start:start + n].view(p.shape)
            out[key] = view if view.dtype == p.dtype else view.to(p.dtype)
            start += n
        if start != flat.numel():
            raise ExternError(f"{self.where}: the parameters of {self.name} changed since the call began "
                              f"({flat.numel()} numbers passed, {start} now)")
        return out

    def apply(self, flat: Tensor, xs: Sequence[Tensor], inputs: Sequence[tuple], output: tuple,
              replay: bool = False) -> Tensor:
        """The module on ``xs`` with its parameters taken from ``flat``, checked against the declared output.
        ``replay``: an evaluation made for a derivative (the VJPs), on clones of the module's buffers, so that only
        the map's own evaluations update them (``BatchNorm``'s running statistics in training mode)."""
        tensors = self._views(flat)
        if replay:
            tensors.update((key, b.clone()) for key, b in self.module.named_buffers())
        y = torch.func.functional_call(self.module, tensors, tuple(xs))
        if not isinstance(y, Tensor):
            raise ExternError(f"{self.where}: {self.name} must return one tensor of shape {_shape_text(output)}, "
                              f"but returned {type(y).__name__}")
        sizes = dict(self.dims)
        for x, shape in zip(xs, inputs):
            sizes.update((d, s) for d, s in zip(shape, x.shape) if is_symbol(d))
        want = [_declared(d, sizes) for d in output]
        if y.dim() != len(output) or any(w is not None and w != s for w, s in zip(want, y.shape)):
            names = dict.fromkeys(s for d in output for s in symbols(d))
            bound = ", ".join(f"{s} = {sizes[s]}" for s in names if s in sizes)
            raise ExternError(f"{self.where}: {self.name} is declared to return {_shape_text(output)}"
                              f"{f' ({bound})' if bound else ''}, but returned a tensor of shape "
                              f"{_shape_text(y.shape)}")
        return y

    def vjp(self, flat: Tensor, args: Sequence[Tensor], inputs: Sequence[tuple], output: tuple,
            chain: Sequence[int]) -> Tensor:
        """The nested VJP ``chain`` (see :mod:`fpidsl.ir.extern`): ``args`` are the inputs then one cotangent per
        entry of ``chain``; positions count the handle as 0 and ``flat`` as 1. Differentiable to every order.
        Under a ``torch.func`` transform, or with a forward-mode tangent on a tensor (forward over reverse), by
        composed ``torch.func.vjp`` (:func:`_func_nested_vjp`): :class:`_NestedVjp` has neither the
        ``setup_context`` that functorch requires of an ``autograd.Function`` nor a forward-mode rule."""
        tensors = (flat, *args)
        if is_transformed(tensors) or any(forward_tangent(t) is not None for t in tensors):
            return _func_nested_vjp(self, tuple(inputs), tuple(output), tuple(chain), tensors)
        return _NestedVjp.apply(self, tuple(inputs), tuple(output), tuple(chain), flat, *args)


def _func_nested_vjp(handle: ExternHandle, inputs: tuple, output: tuple, chain: tuple,
                     tensors: Sequence[Tensor]) -> Tensor:
    """The nested VJP of :func:`_nested_vjp` as a composition of ``torch.func.vjp``, which every transform (and
    forward-mode AD) differentiates: the same partial derivatives, each ``torch.func.vjp`` taken with respect to one
    argument while the others are held (they stay visible to the enclosing transforms)."""
    n = 1 + len(inputs)

    def value(*ts: Tensor) -> Tensor:
        return handle.apply(ts[0], ts[1:n], inputs, output, replay=True)

    fn = value
    for j, pos in enumerate(chain):
        fn = _pulled(fn, pos - 1, n + j)
    # a chain of two or more differentiates a VJP again: torch's faulty derivatives worked around
    with norms_with_a_separate_bias(higher=True) if len(chain) > 1 else contextlib.nullcontext():
        return fn(*tensors)


def _float_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The first floating-point dtype among ``tensors`` (the cotangents'), else torch's default: the dtype of the
    zero cotangent of an integer argument."""
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())


def _zero_cotangent(target: Tensor, like: Sequence[Tensor]) -> Tensor:
    """The cotangent of an argument the value does not depend on differentiably: zeros of its shape, in its dtype
    when it is floating point, else in the cotangents' (an integer argument, ``x.long()`` made by another extern,
    has a zero derivative, as in autograd, and the layer's cotangents are floating point)."""
    dtype = target.dtype if target.is_floating_point() else _float_dtype(like)
    return torch.zeros(target.shape, dtype=dtype, device=target.device)


def _pulled(fn: Callable[..., Tensor], index: int, cotangent: int) -> Callable[..., Tensor]:
    """``ts -> (d fn(ts) / d ts[index])^T ts[cotangent]`` (zeros where ``fn`` does not read ``ts[index]``, or
    where ``ts[index]`` is an integer tensor, which takes no derivative)."""
    def pulled(*ts: Tensor) -> Tensor:
        if not (ts[index].is_floating_point() or ts[index].is_complex()):
            return _zero_cotangent(ts[index], ts[cotangent:cotangent + 1])
        _, pull = torch.func.vjp(lambda t: fn(*ts[:index], t, *ts[index + 1:]), ts[index])
        return pull(ts[cotangent])[0]

    return pulled


def _nested_vjp(handle: ExternHandle, inputs: tuple, output: tuple, chain: tuple, tensors: Sequence[Tensor]) -> Tensor:
    """The value of the nested VJP at ``tensors`` (``flat``, the inputs, the cotangents), computed on detached copies:
    the partial derivatives with respect to these arguments as independent variables (never through how one of them
    was computed from another: x̂ from the inputs, say)."""
    leaves = [t.detach() for t in tensors]
    for pos in set(chain):  # an integer tensor (an extern's x.long()) takes no gradient: its cotangent is zero
        if leaves[pos - 1].is_floating_point() or leaves[pos - 1].is_complex():
            leaves[pos - 1].requires_grad_(True)
    n = 1 + len(inputs)
    # a chain of two or more differentiates a VJP again: torch's faulty derivatives worked around
    with torch.enable_grad(), (norms_with_a_separate_bias(higher=True) if len(chain) > 1 else contextlib.nullcontext()):
        value = handle.apply(leaves[0], leaves[1:n], inputs, output, replay=True)
        for j, pos in enumerate(chain):
            target = leaves[pos - 1]
            grad = None
            if value.requires_grad and target.requires_grad:
                (grad,) = torch.autograd.grad(value, target, leaves[n + j], create_graph=j < len(chain) - 1,
                                              allow_unused=True)
            value = _zero_cotangent(target, leaves[n:]) if grad is None else grad
    return value.detach()


class _NestedVjp(torch.autograd.Function):
    """``extern_vjp`` as an autograd operation whose backward is ``extern_vjp`` with one more entry in the chain, so
    autograd differentiates it to every order, as the compiler's VJP rule does."""

    @staticmethod
    def forward(ctx, handle: ExternHandle, inputs: tuple, output: tuple, chain: tuple, *tensors: Tensor) -> Tensor:
        ctx.handle, ctx.inputs, ctx.output, ctx.chain = handle, inputs, output, chain
        ctx.save_for_backward(*tensors)
        return _nested_vjp(handle, inputs, output, chain, tensors)

    @staticmethod
    def backward(ctx, ct: Tensor):
        tensors = ctx.saved_tensors
        grads = [_NestedVjp.apply(ctx.handle, ctx.inputs, ctx.output, ctx.chain + (i + 1,), *tensors, ct)
                 if need else None for i, need in enumerate(ctx.needs_input_grad[4:])]
        return (None, None, None, None, *grads)


def handle(layer: nn.Module, name: str) -> ExternHandle:
    """The handle of ``layer``'s extern ``name`` for the call in progress (its sizes bound by ``forward``)."""
    where, _ = type(layer).EXTERNS[name]
    from .layer import call_in_progress

    return ExternHandle(getattr(layer, name), name, where, call_in_progress(layer).get("dims", {}))
