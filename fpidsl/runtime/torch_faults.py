"""Work-arounds for faults of PyTorch's own derivatives that would reach fpidsl's gradients.

:func:`norms_with_a_separate_bias` runs ``layer_norm`` and ``group_norm`` with a bias as the norm without it plus
the bias, whose derivatives are right (the values agree to rounding). torch 2.13's fused forms have two faults:

- with a bias and no weight (``F.layer_norm(x, shape, None, b)``), the double backward of ``layer_norm`` drops the
  bias gradient's dependence on the output gradient: a second derivative through the bias reads 0 (-93.26 with a
  weight of ones, ``None`` from the fused form, on a 3 x 5 input; plain autograd says "appears to not have been
  used in the graph", the backward of a fixed point made it a silently wrong zero), and ``group_norm``'s backward
  fails outright ("tensor does not have a device", "shape '[0]' is invalid");
- with a weight and a bias, ``torch.func.hessian`` (forward over reverse) of a fixed point of a ``layer_norm`` map
  with respect to the bias fails ("output with shape [3, 4] doesn't match the broadcast shape [4, 3, 4]").

The runtime uses the mode where it evaluates a map to differentiate it (:class:`~fpidsl.runtime.adjoint.
AutogradAdjoint`, the tangent rules of :mod:`~fpidsl.runtime.transforms`, an extern's nested VJPs), never in the
forward solve: about 2 µs more a torch call of the map (a Python call each), on the backward's side only.

Where the evaluation is recorded for a derivative of higher order (``higher=True``: a backward with
``create_graph``, a torch.func transform, an extern's VJP of a VJP), the mode also runs ``layer_norm``, and
``instance_norm`` and training-mode ``batch_norm`` without running statistics, as their formulas
(:func:`layer_norm_written_out`): torch 2.13's fused kernels have a wrong third derivative (their double backward's
own backward; a third-order directional derivative of ``F.layer_norm`` on a 1 x 4 input read 0.125 where finite
differences and the formula give -0.269; ``gradgradcheck`` of their gradients fails, group_norm's passes). The
formulas cost a few more kernels than the fused forms, on that path only, and are used in float32 and float64
outside autocast (:func:`written_out_keeps_precision`). The emitted code's ``ops.layer_norm``, where autograd
records it (a layer's outputs, ``unrolled``), is :func:`layer_norm_exact`: torch's fused forward and first
backward, the formula's backward of a backward. Batch norm with running statistics
keeps torch's kernel (its statistics' update is the kernel's): its third derivative stays torch's.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

_NORMS = {F.layer_norm: "layer", torch.layer_norm: "layer", F.group_norm: "group", torch.group_norm: "group"}
# the functional forms whose third derivative torch gets wrong (torch.batch_norm and torch.instance_norm, which they
# call, take their arguments in another order: left to torch)
_WRITTEN_OUT = {F.layer_norm: "layer", torch.layer_norm: "layer", F.instance_norm: "instance", F.batch_norm: "batch"}
_SIGNATURES = {  # by position, for torch's own functions (no Python signature)
    "layer": ("input", "normalized_shape", "weight", "bias", "eps"),
    "group": ("input", "num_groups", "weight", "bias", "eps"),
    "instance": ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
    "batch": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
}


def _bound(func, kind: str, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by name (torch's own functions have no Python signature: by position; one more, such as
    ``cudnn_enable``, is ignored), or None where they do not bind."""
    names = _SIGNATURES[kind]
    try:
        return inspect.signature(func).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        if len(args) > len(names) + 1 or set(kwargs) - set(names):
            return None
        bound = dict(zip(names, args))
        bound.update(kwargs)
        return bound


def layer_norm_written_out(x: torch.Tensor, shape: tuple[int, ...], weight: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` as its formula (mean and biased variance over the last ``len(shape)`` dimensions), whose
    derivatives by autograd are right at every order (see the module's docstring)."""
    return _normalized(x, tuple(range(-len(shape), 0)), eps, weight, bias, 0)


class LayerNormExactAtEveryOrder(torch.autograd.Function):
    """``F.layer_norm`` whose forward and first backward are torch's fused kernels and whose backward, where it is
    itself recorded (``create_graph``), is written with differentiable operations (:func:`_layer_norm_vjp`, the
    formula's VJP): every order right, at the
    fused kernels' cost in first-order training (the formula alone cost 3.5x the fused forward and backward, and
    twice the saved memory, on a [32, 128, 512] input). Forward-mode AD and torch.func transforms take the formula
    (see :func:`layer_norm_exact`)."""

    @staticmethod
    def forward(x, weight, bias, shape, eps):
        return torch.ops.aten.native_layer_norm(x, shape, weight, bias, eps)  # (out, mean, rstd)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, shape, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.shape, ctx.eps = shape, eps
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    @staticmethod
    def backward(ctx, grad, _mean_grad=None, _rstd_grad=None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the VJP written with differentiable operations
            found = iter(_layer_norm_vjp(grad, x, weight, ctx.shape, ctx.eps, ctx.needs_input_grad[:3], bias))
        else:  # torch's own fused backward
            mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                    bias is not None and ctx.needs_input_grad[2]]
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(grad, x, ctx.shape, mean, rstd, weight, bias, mask)
            found = iter(g for g, t, need in zip((gx, gw, gb), (x, weight, bias), ctx.needs_input_grad[:3])
                         if need and t is not None)
        out = [next(found) if need and t is not None else None
               for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3])]
        return (*out, None, None)


def _layer_norm_vjp(grad, x, weight, shape, eps, needs, bias) -> list:
    """The layer norm's VJP as operations autograd differentiates again (mean and variance recomputed from ``x``):
    the gradients wanted of ``x``, ``weight`` and ``bias``, in that order. (A ``torch.autograd.grad`` of the formula
    inside the backward instead made a third derivative through 10 stacked layer norms take 0.7 s, 20 never end.)"""
    dims = tuple(range(-len(shape), 0))
    xhat, rstd = _standardized(x, dims, eps)
    out = []
    if needs[0]:
        gy = grad if weight is None else grad * weight
        out.append(rstd * (gy - gy.mean(dims, keepdim=True) - xhat * (gy * xhat).mean(dims, keepdim=True)))
    lead = tuple(range(x.dim() - len(shape)))
    if weight is not None and needs[1]:
        out.append((grad * xhat).sum(lead) if lead else grad * xhat)
    if bias is not None and needs[2]:
        out.append(grad.sum(lead) if lead else grad)
    return out


def layer_norm_exact(x: torch.Tensor, shape: tuple[int, ...], weight: torch.Tensor | None,
                     bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.layer_norm``, right at every order where autograd may differentiate it: not recorded (the forward solve's
    evaluations), the fused kernel; recorded in grad mode, :class:`LayerNormExactAtEveryOrder`; under forward-mode
    AD or a torch.func transform (where a custom Function would need rules of its own), the formula; the fused
    kernel wherever the formula is less precise (:func:`written_out_keeps_precision`)."""
    tensors = (x, weight, bias)
    transformed = forward_ad._current_level >= 0 or any(
        isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
    recorded = transformed or (torch.is_grad_enabled()
                               and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))
    if not recorded or not written_out_keeps_precision(x):
        return F.layer_norm(x, shape, weight, bias, eps)
    if transformed:
        return layer_norm_written_out(x, shape, weight, bias, eps)
    return LayerNormExactAtEveryOrder.apply(x, weight, bias, tuple(shape), eps)[0]


def written_out_keeps_precision(x: torch.Tensor) -> bool:
    """Whether the formula computes ``x``'s norm as precisely as the fused kernel: in float32 and float64 outside
    autocast (the fused kernels accumulate a half-precision input in float32, and autocast picks their dtype; a
    third derivative in half precision is not what the work-around is for)."""
    return x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type)


def _standardized(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``((x - mean) / sqrt(var + eps), 1 / sqrt(var + eps))`` over ``dims`` (biased variance), differentiable."""
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (x - mean) * rstd, rstd


def _normalized(x: torch.Tensor, dims: tuple[int, ...], eps: float, weight, bias, channel: int | None) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), then ``* weight + bias``: of the trailing
    dimensions (``channel`` 0, layer norm) or per channel (``channel`` 1: dimension 1, batch and instance norm)."""
    y, _ = _standardized(x, dims, eps)
    view = (lambda t: t) if channel == 0 else (lambda t: t.reshape(t.shape[0], *([1] * (x.dim() - 2))))
    if weight is not None:
        y = y * view(weight)
    if bias is not None:
        y = y + view(bias)
    return y


def _written_out(func, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The norm call ``func(*args, **kwargs)`` computed by its formula, or None where it is not one this module
    writes out (batch norm with running statistics, an instance norm using them, unknown arguments)."""
    kind = _WRITTEN_OUT[func]
    bound = _bound(func, kind, args, kwargs)
    if bound is None:
        return None
    x, weight, bias = bound["input"], bound.get("weight"), bound.get("bias")
    if not written_out_keeps_precision(x):
        return None
    if kind == "layer":
        return layer_norm_written_out(x, tuple(bound["normalized_shape"]), weight, bias, bound.get("eps", 1e-5))
    if bound.get("running_mean") is not None or bound.get("running_var") is not None:
        return None
    if kind == "instance" and bound.get("use_input_stats", True) is False:
        return None
    if kind == "batch" and not bound.get("training", False):
        return None
    dims = tuple(range(2, x.dim())) if kind == "instance" else (0, *range(2, x.dim()))
    return _normalized(x, dims, bound.get("eps", 1e-5), weight, bias, 1)


class _SeparateBias(TorchFunctionMode):
    """``layer_norm`` / ``group_norm`` with a bias as the norm without it plus the bias; with ``higher``, the norms
    whose third derivative torch gets wrong as their formulas."""

    def __init__(self, higher: bool = False):
        super().__init__()
        self.higher = higher

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.higher and func in _WRITTEN_OUT:
            out = _written_out(func, args, kwargs)
            if out is not None:
                return out
        if func in _NORMS:
            bound = _bound(func, _NORMS[func], args, kwargs)
            if bound is not None and isinstance(bound.get("bias"), torch.Tensor):
                x, weight, bias = bound["input"], bound.get("weight"), bound["bias"]
                eps = bound.get("eps", 1e-5)
                if _NORMS[func] == "layer":
                    return F.layer_norm(x, bound["normalized_shape"], weight, None, eps) + bias
                channels = bias.reshape(bias.shape[0], *([1] * (x.dim() - 2)))
                return F.group_norm(x, bound["num_groups"], weight, None, eps) + channels
        return func(*args, **kwargs)


@contextlib.contextmanager
def norms_with_a_separate_bias(higher: bool = False) -> Iterator[None]:
    """Run the enclosed code with the norms' biases added separately, and (``higher``: recorded for a derivative of
    higher order) the norms with a faulty third derivative written out (see the module's docstring)."""
    with _SeparateBias(higher):
        yield
