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
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_NORMS = {F.layer_norm: "layer", torch.layer_norm: "layer", F.group_norm: "group", torch.group_norm: "group"}


def _bound(func, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by name (torch's own functions have no Python signature: by position)."""
    names = {"layer": ("input", "normalized_shape", "weight", "bias", "eps"),
             "group": ("input", "num_groups", "weight", "bias", "eps")}[_NORMS[func]]
    try:
        return inspect.signature(func).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        if len(args) > len(names) + 1 or set(kwargs) - set(names):
            return None
        bound = dict(zip(names, args))
        bound.update(kwargs)
        return bound


class _SeparateBias(TorchFunctionMode):
    """``layer_norm`` / ``group_norm`` with a bias as the norm without it plus the bias."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NORMS:
            bound = _bound(func, args, kwargs)
            if bound is not None and isinstance(bound.get("bias"), torch.Tensor):
                x, weight, bias = bound["input"], bound.get("weight"), bound["bias"]
                eps = bound.get("eps", 1e-5)
                if _NORMS[func] == "layer":
                    return F.layer_norm(x, bound["normalized_shape"], weight, None, eps) + bias
                channels = bias.reshape(bias.shape[0], *([1] * (x.dim() - 2)))
                return F.group_norm(x, bound["num_groups"], weight, None, eps) + channels
        return func(*args, **kwargs)


@contextlib.contextmanager
def norms_with_a_separate_bias() -> Iterator[None]:
    """Run the enclosed code with the norms' biases added separately (see the module's docstring)."""
    with _SeparateBias():
        yield
