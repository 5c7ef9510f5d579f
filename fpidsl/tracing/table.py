"""The PyTorch operations a traced map may use, each written as ``.fpi`` text over the primitive table.

A handler takes the :class:`~fpidsl.tracing.writer.Writer` (which turns values into text: a tensor is its spec
name, a number its literal) and the call's arguments bound to their names, and returns the expression of the
node's value. ``torch.tanh(x)``, ``x.tanh()``, ``F.tanh(x)`` and ``nn.Tanh()`` reach the same handler: functions
and methods are keyed by a canonical name (:data:`FUNCTIONS`, method names as they are), modules by their class
(:data:`MODULES`). A handler raises :class:`~fpidsl.tracing.fx_capture.UntraceableError` for a form it does not
cover (``F.softplus`` with a threshold other than 20, a convolution with groups ...).
"""
from __future__ import annotations

import builtins
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .fx_capture import BatchDim, UntraceableError

Handler = Callable[..., str]

# canonical name -> (handler, argument names (``a|b``: accepted aliases), defaults)
OPS: dict[str, tuple[Handler, tuple[str, ...], dict[str, Any]]] = {}
SPACES = (torch, F, operator, torch.linalg, torch.special)  # where a canonical name's functions are looked up
ONLY_IN: dict[str, tuple] = {}  # the names looked up in fewer modules (see :func:`op`)


def op(*names: str, args: tuple[str, ...] = ("input|self",), spaces: tuple | None = None, **defaults: Any):
    """Register a handler under canonical ``names`` with its argument names and defaults; ``spaces``: the modules
    whose function of that name it handles (default :data:`SPACES`; another function of the name takes other
    arguments, such as ``torch.embedding(weight, input)`` against ``F.embedding(input, weight)``)."""
    def register(fn: Handler) -> Handler:
        for name in names:
            OPS[name] = (fn, args, defaults)
            if spaces is not None:
                ONLY_IN[name] = spaces
        return fn

    return register


def bind(name: str, args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict) -> dict[str, Any]:
    """The call's arguments by their first names (``*``: the remaining positional ones, as a tuple); an argument
    the handler does not know is refused."""
    rest = names[-1] == "*"
    if rest:
        names = names[:-1]
    if len(args) > len(names) and not rest:
        raise UntraceableError(f"{name} with {len(args)} positional arguments")
    bound = {names[i].split("|")[0]: a for i, a in enumerate(args[:len(names)])}
    if rest:
        bound["*"] = tuple(args[len(names):])
    aliases = {alias: n.split("|")[0] for n in names for alias in n.split("|")}
    for key, value in kwargs.items():
        if key not in aliases and key not in defaults:  # a keyword-only argument has a default
            raise UntraceableError(f"{name} with the argument {key}=")
        bound[aliases.get(key, key)] = value
    for key in names:
        first = key.split("|")[0]
        if first not in bound and first not in defaults:
            raise UntraceableError(f"{name} without its argument {first}")
    return {**defaults, **bound}


# --------------------------------------------------------------------------- elementwise

_UNARY = ("relu", "tanh", "sigmoid", "exp", "log", "sqrt", "square", "abs", "sin", "cos", "erf", "sign",
          "reciprocal", "silu")
for _name in _UNARY:
    op(_name, args=("input|self", "inplace"), inplace=False)(lambda w, a, _n=_name: f"{_n}({w.text(a['input'])})")


@op("neg")
def _neg(w, a):
    return f"-{w.text(a['input'])}"


@op("rsqrt")
def _rsqrt(w, a):
    return f"reciprocal(sqrt({w.text(a['input'])}))"


@op("leaky_relu", args=("input|self", "negative_slope", "inplace"), negative_slope=0.01, inplace=False)
def _leaky_relu(w, a):
    return f"leaky_relu({w.text(a['input'])}, slope={w.number(a['negative_slope'])})"


@op("elu", args=("input|self", "alpha", "inplace"), alpha=1.0, inplace=False)
def _elu(w, a):
    return f"elu({w.text(a['input'])}, alpha={w.number(a['alpha'])})"


@op("softplus", args=("input|self", "beta", "threshold"), beta=1.0, threshold=20)
def _softplus(w, a):
    if a["threshold"] != 20:
        raise UntraceableError("softplus with a threshold other than 20")
    return f"softplus({w.text(a['input'])}, beta={w.number(a['beta'])})"


@op("gelu", args=("input|self", "approximate"), approximate="none")
def _gelu(w, a):
    if a["approximate"] not in ("none", "tanh"):
        raise UntraceableError(f"gelu with approximate={a['approximate']!r}")
    return f"gelu({w.text(a['input'])}, approximate={a['approximate']})"


@op("clamp", "clip", args=("input|self", "min", "max"), min=None, max=None)
def _clamp(w, a):
    """Both bounds numbers: the language's ``clamp`` (its derivative is torch.clamp's, 1 on the closed interval
    ``lo <= x <= hi``). One bound (a number or a tensor): ``where``, not ``maximum`` / ``minimum`` (which split a
    tie 1/2 - 1/2, as torch.maximum does): torch.clamp's derivative is 1 in ``x`` at the bound and 0 in the bound,
    ``clamp(x, min=t)`` is ``where(x < t, t, x)`` (NaN stays NaN, as in torch)."""
    x, lo, hi = w.text(a["input"]), a["min"], a["max"]
    if lo is not None and hi is not None:
        return f"clamp({x}, {w.number(lo)}, {w.number(hi)})"
    if lo is None and hi is None:
        raise UntraceableError("clamp without bounds")
    bound = w.text(lo if lo is not None else hi)
    return f"where({x} {'<' if lo is not None else '>'} {bound}, {bound}, {x})"


def _inside(w, x: Any, lo: Any, hi: Any) -> str:
    """torch's hardtanh(x, lo, hi): clamp's value, with the derivative 1 on the open interval ``lo < x < hi`` only
    (torch's hardtanh_backward is strict: 0 at the bounds, where the language's ``clamp`` has 1): the bounds are
    constants where ``x <= lo`` or ``x >= hi``, ``x`` elsewhere (NaN stays NaN)."""
    w.number(lo), w.number(hi)  # numbers only (a tensor bound is refused)
    lo, hi = float(lo), float(hi)
    if lo > hi:
        raise UntraceableError(f"hardtanh with min_val {lo!r} above max_val {hi!r}")
    lo, hi, x = w.text(lo), w.text(hi), w.text(x)
    return f"where({x} <= {lo}, {lo}, where({x} >= {hi}, {hi}, {x}))"


@op("hardtanh", args=("input|self", "min_val", "max_val", "inplace"), min_val=-1.0, max_val=1.0, inplace=False)
def _hardtanh(w, a):
    return _inside(w, a["input"], a["min_val"], a["max_val"])


@op("relu6", args=("input|self", "inplace"), inplace=False)
def _relu6(w, a):  # torch's relu6 is hardtanh(x, 0, 6): derivative 0 at 0 and at 6
    return _inside(w, a["input"], 0.0, 6.0)


@op("minimum", "maximum", args=("input|self", "other"))
def _extreme(w, a):
    return f"{w.current}({w.text(a['input'])}, {w.text(a['other'])})"


@op("max", "min", args=("input|self", "dim|other", "keepdim"), dim=None, keepdim=False)
def _max_min(w, a):
    """``torch.max(x)`` (over every element) and ``torch.max(x, other)`` (elementwise); with a dim, torch returns
    values and indices, which no primitive gives: refused here (an extern, where the result can be one)."""
    if a["dim"] is None:
        if a["keepdim"]:
            raise UntraceableError(f"{w.current} with keepdim and no dim")
        every = tuple(range(len(w.shape(a["input"]))))
        return f"{w.current}({w.text(a['input'])}, dim={w.attr(every)}, keepdim=false)"
    if isinstance(a["dim"], (int, list, tuple)):
        raise UntraceableError(f"{w.current} along a dim (values and indices)")
    return f"{w.current}imum({w.text(a['input'])}, {w.text(a['dim'])})"


@op("where", args=("condition", "input|self", "other"))
def _where(w, a):
    return f"where({w.text(a['condition'])}, {w.text(a['input'])}, {w.text(a['other'])})"


@op("masked_fill", args=("input|self", "mask", "value"))
def _masked_fill(w, a):  # x.masked_fill(mask, v): v where the mask holds, x elsewhere
    return f"where({w.text(a['mask'])}, {w.text(a['value'])}, {w.text(a['input'])})"


# --------------------------------------------------------------------------- arithmetic and comparisons

_OPERATORS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "matmul": "@", "lt": "<", "le": "<=", "gt": ">",
              "ge": ">=", "eq": "==", "ne": "!="}


@op("add", "sub", args=("input|self|a", "other|b", "alpha"), alpha=1)
def _add_sub(w, a):
    """``a + b``, ``a - alpha * b``. Two bool tensors (comparisons, which the layer holds as 0/1 masks) add as
    torch adds them, a logical or (``True + True`` is ``True``): ``maximum(a, b)``, not the 2 of ``a + b``. (A bool
    ``-`` raises in torch, at the trace's record.)"""
    if w.gives_bool():
        if w.current != "add" or a["alpha"] not in (1, True) or not (w.is_bool(a["input"]) and w.is_bool(a["other"])):
            raise UntraceableError(f"{w.current} of bool tensors with alpha={a['alpha']!r} or a bool number")
        return f"maximum({w.text(a['input'])}, {w.text(a['other'])})"
    other = w.text(a["other"]) if a["alpha"] == 1 else f"{w.number(a['alpha'])} * {w.text(a['other'])}"
    return f"{w.text(a['input'])} {_OPERATORS[w.current]} {other}"


@op("mul", "matmul", "lt", "le", "gt", "ge", "eq", "ne", args=("input|self|a", "other|b"))
def _binary(w, a):
    return f"{w.text(a['input'])} {_OPERATORS[w.current]} {w.text(a['other'])}"


def _bool_operands(w, a, names: tuple[str, ...]) -> list[str]:
    """The operands of a bitwise operation (``~ & | ^``) when all are bool tensors (masks), as text; an integer
    operand (or a number) is refused (an extern then runs torch's integer operation)."""
    if not all(w.is_bool(a[n]) for n in names):
        raise UntraceableError(f"{w.current} of other than bool tensors (masks)")
    return [w.text(a[n]) for n in names]


def _truth(w, value: Any) -> str:
    """``value != 0`` as a mask (a mask itself where it is one): torch's truth of a tensor's elements."""
    if not w.is_tensor(value):
        raise UntraceableError(f"{w.current} of a number")
    return w.text(value) if w.is_bool(value) else f"({w.text(value)} != 0)"


# Logical operations on masks (0/1 in the layer, bool in torch; the results are masks): not is ``m == 0``, and is
# ``m * n``, or is ``maximum(m, n)``, xor is ``m != n``; the logical_* functions also take numbers as truth values
@op("invert", "inv", "bitwise_not")
def _not(w, a):
    (m,) = _bool_operands(w, a, ("input",))
    return f"{m} == 0"


@op("logical_not")
def _logical_not(w, a):
    if not w.is_tensor(a["input"]):
        raise UntraceableError("logical_not of a number")
    return f"{w.text(a['input'])} == 0"


_LOGICAL = {"and": "{} * {}", "or": "maximum({}, {})", "xor": "{} != {}"}
_BITWISE_NAMES = {"and_": "and", "bitwise_and": "and", "or_": "or", "bitwise_or": "or", "xor": "xor",
                  "bitwise_xor": "xor"}


@op(*_BITWISE_NAMES, args=("input|self|a", "other|b"))
def _bitwise(w, a):
    return _LOGICAL[_BITWISE_NAMES[w.current]].format(*_bool_operands(w, a, ("input", "other")))


@op("logical_and", "logical_or", "logical_xor", args=("input|self", "other"))
def _logical(w, a):
    return _LOGICAL[w.current.removeprefix("logical_")].format(_truth(w, a["input"]), _truth(w, a["other"]))


@op("div", args=("input|self|a", "other|b", "rounding_mode"), rounding_mode=None)
def _div(w, a):
    if a["rounding_mode"] is not None:
        raise UntraceableError(f"div with rounding_mode={a['rounding_mode']!r}")
    return f"{w.text(a['input'])} / {w.text(a['other'])}"


@op("pow", args=("input|self|a", "exponent|b"))
def _pow(w, a):
    if w.is_tensor(a["exponent"]):
        raise UntraceableError("pow with a tensor exponent")
    return f"{w.text(a['input'])} ** {w.number(a['exponent'])}"


# --------------------------------------------------------------------------- reductions


def _dims(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


@op("sum", "mean", args=("input|self", "dim|axis", "keepdim", "dtype"), dim=None, keepdim=False, dtype=None)
def _sum_mean(w, a):
    w.no_dtype(a)
    dim = _dims(a["dim"])
    parts = [w.text(a["input"])] + ([] if dim is None or dim == () else [f"dim={w.attr(dim)}"])
    if a["keepdim"]:
        parts.append("keepdim=true")
    return f"{w.current}({', '.join(parts)})"


@op("logsumexp", args=("input|self", "dim", "keepdim"), keepdim=False)
def _logsumexp(w, a):
    return f"logsumexp({w.text(a['input'])}, dim={w.attr(_dims(a['dim']))}, keepdim={w.attr(a['keepdim'])})"


@op("amax", "amin", args=("input|self", "dim", "keepdim"), dim=(), keepdim=False)
def _amax(w, a):
    dim = _dims(a["dim"])
    if dim == ():
        dim = tuple(range(len(w.shape(a["input"]))))
    return f"{w.current[1:]}({w.text(a['input'])}, dim={w.attr(dim)}, keepdim={w.attr(a['keepdim'])})"


@op("prod", args=("input|self", "dim", "keepdim", "dtype"), keepdim=False, dtype=None)
def _prod(w, a):
    w.no_dtype(a)
    return f"prod({w.text(a['input'])}, dim={w.attr(a['dim'])}, keepdim={w.attr(a['keepdim'])})"


@op("var", args=("input|self", "dim", "unbiased", "keepdim", "correction"), dim=None, unbiased=None,
    keepdim=False, correction=None)
def _var(w, a):
    if a["dim"] is None:
        raise UntraceableError("var over every dimension")
    correction = a["correction"] if a["correction"] is not None else (0 if a["unbiased"] is False else 1)
    return (f"var({w.text(a['input'])}, dim={w.attr(_dims(a['dim']))}, keepdim={w.attr(a['keepdim'])}, "
            f"correction={w.attr(int(correction))})")


@op("norm", args=("input|self", "p", "dim", "keepdim", "dtype"), p=2, dim=None, keepdim=False, dtype=None)
def _norm(w, a):
    return _p_norm(w, a["input"], a["p"], a["dim"], a["keepdim"], a["dtype"])


@op("vector_norm", args=("input|x", "ord", "dim", "keepdim", "dtype"), ord=2, dim=None, keepdim=False, dtype=None)
def _vector_norm(w, a):
    return _p_norm(w, a["input"], a["ord"], a["dim"], a["keepdim"], a["dtype"])


def _p_norm(w, x, p, dim, keepdim, dtype):
    if dtype is not None or p in ("fro",):
        p = 2 if p == "fro" and dtype is None else None
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 1 <= p < float("inf"):
        raise UntraceableError(f"a norm with p={p!r}")
    parts = [w.text(x)] + ([] if dim is None else [f"dim={w.attr(_dims(dim))}"])
    parts += [f"p={w.number(p)}"] + (["keepdim=true"] if keepdim else [])
    return f"norm({', '.join(parts)})"


def _softmax_dtype(w, a) -> None:
    """Refuse a dtype, which ``torch.softmax(x, dim, dtype)`` and ``x.softmax(dim, dtype)`` pass third, where
    ``F.softmax`` (whose argument list the table binds) has ``_stacklevel``."""
    if isinstance(a["_stacklevel"], torch.dtype):
        a["dtype"] = a["_stacklevel"]
    w.no_dtype(a)


@op("softmax", args=("input|self", "dim", "_stacklevel", "dtype"), _stacklevel=3, dtype=None)
def _softmax(w, a):
    _softmax_dtype(w, a)
    if a["dim"] is None:
        raise UntraceableError("softmax without dim")
    return f"softmax({w.text(a['input'])}, dim={w.attr(a['dim'])})"


@op("log_softmax", args=("input|self", "dim", "_stacklevel", "dtype"), _stacklevel=3, dtype=None)
def _log_softmax(w, a):
    _softmax_dtype(w, a)
    x = w.text(a["input"])
    return f"{x} - logsumexp({x}, dim={w.attr(a['dim'])}, keepdim=true)"


# --------------------------------------------------------------------------- shapes


@op("cat", "concat", "concatenate", args=("tensors", "dim|axis"), dim=0)
def _cat(w, a):
    return f"cat([{', '.join(w.text(t) for t in a['tensors'])}], dim={w.attr(a['dim'])})"


@op("stack", args=("tensors", "dim"), dim=0)
def _stack(w, a):
    items = ", ".join(f"unsqueeze({w.text(t)}, {w.attr(a['dim'])})" for t in a["tensors"])
    return f"cat([{items}], dim={w.attr(a['dim'])})"


@op("reshape", "view", "unflatten", "squeeze", "view_as", "reshape_as", args=("input|self", "*"))
def _reshape(w, a):
    return f"reshape({w.text(a['input'])}, {w.target_shape()})"


@op("flatten", args=("input|self", "start_dim", "end_dim"), start_dim=0, end_dim=-1)
def _flatten(w, a):
    return f"flatten({w.text(a['input'])}, start={w.attr(a['start_dim'])}, end={w.attr(a['end_dim'])})"


@op("unsqueeze", args=("input|self", "dim"))
def _unsqueeze(w, a):
    return f"unsqueeze({w.text(a['input'])}, {w.attr(a['dim'])})"


@op("transpose", "swapaxes", "swapdims", args=("input|self", "dim0|axis0", "dim1|axis1"))
def _transpose(w, a):
    return f"transpose({w.text(a['input'])}, {w.attr(a['dim0'])}, {w.attr(a['dim1'])})"


@op("t")
def _t(w, a):
    if len(w.shape(a["input"])) < 2:
        return w.text(a["input"])
    return f"transpose({w.text(a['input'])}, 0, 1)"


@op("permute", args=("input|self", "*"))
def _permute(w, a):
    dims = a["*"]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return f"permute({w.text(a['input'])}, {w.attr(tuple(dims))})"


@op("triu", "tril", args=("input|self", "diagonal"), diagonal=0)
def _triangle(w, a):
    return f"{w.current}({w.text(a['input'])}, diagonal={w.attr(a['diagonal'])})"


@op("identity", args=("input|self", "*"))
def _identity(w, a):
    return w.text(a["input"])


def _made(w, a) -> None:
    if a["requires_grad"]:
        raise UntraceableError(f"{w.current} with requires_grad=True (a leaf made inside the map)")
    w.constructed_in_state_dtype()


def _constant_shape(w) -> tuple[int, ...]:
    shape = w.node_shape()
    if any(isinstance(d, BatchDim) for d in shape):
        raise UntraceableError(f"{w.current} of a size that follows the batch (make it from a tensor: 0 * x)")
    return shape


_MADE = {"dtype": None, "device": None, "layout": None, "requires_grad": False, "pin_memory": False}


@op("eye", args=("n", "m"), m=None, **_MADE)
def _eye(w, a):
    _made(w, a)
    if a["m"] is not None and a["m"] != a["n"]:
        raise UntraceableError("eye(n, m) of a rectangle")
    return f"eye({w.attr(a['n'])})"


@op("zeros", "ones", args=("*",), **_MADE)
def _filled(w, a):
    _made(w, a)
    return f"{w.current}({w.attr(_constant_shape(w))})"


@op("full", args=("size", "fill_value"), **_MADE)
def _full(w, a):
    _made(w, a)
    return f"full({w.attr(_constant_shape(w))}, {w.number(a['fill_value'])})"


@op("linear", args=("input", "weight", "bias"), bias=None)
def _linear(w, a):
    out = f"{w.text(a['input'])} @ transpose({w.text(a['weight'])}, 0, 1)"
    return out if a["bias"] is None else f"{out} + {w.text(a['bias'])}"


@op("conv2d", args=("input", "weight", "bias", "stride", "padding", "dilation", "groups"), bias=None, stride=1,
    padding=0, dilation=1, groups=1, spaces=(F, torch))
def _conv2d(w, a):
    """``F.conv2d(x, W, b, stride, padding)`` with tensor weights: the language's ``conv2d(x, W, b, ...)``."""
    if _pair(a["dilation"]) != (1, 1) or a["groups"] != 1 or isinstance(a["padding"], str):
        raise UntraceableError("conv2d with groups, dilation or a padding given as a word")
    stride, padding = _pair(a["stride"]), _pair(a["padding"])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (*stride, *padding)):
        raise UntraceableError("conv2d with a stride or padding that is not integers")
    parts = [w.text(a["input"]), w.text(a["weight"])] + ([] if a["bias"] is None else [w.text(a["bias"])])
    parts += [f"stride={w.attr(stride)}"] * (stride != (1, 1)) + [f"padding={w.attr(padding)}"] * (padding != (0, 0))
    return f"conv2d({', '.join(parts)})"


def _normalized(w, a, name: str, size: str, bias_shape: list[int] | None = None) -> str:
    """``name(x, size, W, b, eps=)``: the language's function forms of the normalisations; a bias without a weight
    (which they have no form of) is added to the weightless form, reshaped to ``bias_shape`` when given."""
    eps = a["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise UntraceableError(f"{name} with an eps that is not a number above 0")
    weighted = a["weight"] is not None
    parts = [w.text(a["input"]), size] + [w.text(a[k]) for k in ("weight", "bias") if weighted and a[k] is not None]
    call = f"{name}({', '.join(parts + [f'eps={w.number(eps)}'] * (eps != 1e-5))})"
    if weighted or a["bias"] is None:
        return call
    bias = w.text(a["bias"])
    return f"{call} + {bias if bias_shape is None else f'reshape({bias}, {w.attr(bias_shape)})'}"


_NORM_DEFAULTS = {"weight": None, "bias": None, "eps": 1e-5}


@op("group_norm", args=("input", "num_groups", "weight", "bias", "eps"), spaces=(F,), **_NORM_DEFAULTS)
def _group_norm(w, a):
    """``F.group_norm(x, groups, W, b, eps)``: the language's ``group_norm(x, groups, W, b, eps=)``."""
    if isinstance(a["num_groups"], bool) or not isinstance(a["num_groups"], int):
        raise UntraceableError("group_norm with a number of groups that is not an integer")
    rank = len(w.shape(a["input"]))
    return _normalized(w, a, "group_norm", str(a["num_groups"]), [-1] + [1] * (rank - 2) if rank > 2 else None)


@op("layer_norm", args=("input", "normalized_shape", "weight", "bias", "eps"), spaces=(F,), **_NORM_DEFAULTS)
def _layer_norm(w, a):
    """``F.layer_norm(x, shape, W, b, eps)``: the language's ``layer_norm(x, [..], W, b, eps=)``."""
    shape = a["normalized_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(type(d) is int for d in shape):
        raise UntraceableError("layer_norm over sizes that are not integers")
    return _normalized(w, a, "layer_norm", w.attr(shape))


@op("dropout", args=("input|self", "p", "training", "inplace"), p=0.5, training=True, inplace=False)
def _dropout(w, a):
    if a["training"] and a["p"] != 0:
        raise UntraceableError("dropout in training mode (a random map has no fixed point)")
    return w.text(a["input"])


@op("to", "type", "float", "double", "contiguous", "clone", args=("input|self", "*"))
def _same_value(w, a):
    if not w.same_dtype(a["input"]):
        raise UntraceableError(f"{w.current} changes the dtype")
    return w.text(a["input"])


@op("getitem", args=("input|self", "index"))
def _getitem(w, a):
    index = a["index"] if isinstance(a["index"], tuple) else (a["index"],)
    return f"{w.text(a['input'])}[{', '.join(w.index_item(i) for i in index)}]"


@op("T")
def _transposed(w, a):
    rank = len(w.shape(a["input"]))
    return f"permute({w.text(a['input'])}, {w.attr(tuple(reversed(range(rank))))})"


@op("mT")
def _matrix_transposed(w, a):
    return f"transpose({w.text(a['input'])}, -2, -1)"


# --------------------------------------------------------------------------- functions and methods by name

# --------------------------------------------------------------------------- indexing (int / bool arguments)


@op("gather", args=("input|self", "dim", "index", "sparse_grad"), sparse_grad=False)
def _gather(w, a):
    if a["sparse_grad"]:
        raise UntraceableError("gather with sparse_grad=True")
    return f"gather({w.text(a['input'])}, {w.attr(a['dim'])}, {w.text(a['index'])})"


@op("index_select", args=("input|self", "dim", "index"))
def _index_select(w, a):
    return f"index_select({w.text(a['input'])}, {w.attr(a['dim'])}, {w.text(a['index'])})"


@op("embedding", args=("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    spaces=(F,), padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False)
def _embedding(w, a):
    """``F.embedding(ids, weight)``: the rows ``ids`` of the 2-D weight, ``index_select`` of the flattened ids
    reshaped to ``[*ids.shape, dim]`` (an ``Embedding`` module is the language's ``Embedding``)."""
    if a["padding_idx"] is not None or a["max_norm"] is not None or a["scale_grad_by_freq"] or a["sparse"]:
        raise UntraceableError("embedding with padding_idx, max_norm, scale_grad_by_freq or sparse")
    if len(w.shape(a["weight"])) != 2:
        raise UntraceableError("embedding of other than a 2-D weight")
    ids = w.text(a["input"])
    flat = ids if len(w.shape(a["input"])) == 1 else f"flatten({ids}, start=0, end=-1)"
    return f"reshape(index_select({w.text(a['weight'])}, 0, {flat}), {w.target_shape()})"


# --------------------------------------------------------------------------- pooling and resampling

def _window(w, a, name: str) -> str:
    """``avg_pool2d`` / ``max_pool2d`` with torch's defaults: the stride is the kernel unless given."""
    if a["ceil_mode"]:
        raise UntraceableError(f"{name} with ceil_mode=True")
    kernel = _pair(a["kernel_size"])
    stride = kernel if a["stride"] is None or (isinstance(a["stride"], (list, tuple)) and not a["stride"]) \
        else _pair(a["stride"])
    return (f"{name}({w.text(a['input'])}, kernel={w.attr(kernel)}, stride={w.attr(stride)}, "
            f"padding={w.attr(_pair(a['padding']))})")


@op("avg_pool2d", args=("input|self", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                        "divisor_override"), stride=None, padding=0, ceil_mode=False, count_include_pad=True,
    divisor_override=None)
def _avg_pool2d(w, a):
    if not a["count_include_pad"] or a["divisor_override"] is not None:  # the primitive counts the zero padding
        raise UntraceableError("avg_pool2d with count_include_pad=False or a divisor_override")
    return _window(w, a, "avg_pool2d")


@op("max_pool2d", args=("input|self", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                        "return_indices"), stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False)
def _max_pool2d(w, a):
    if _pair(a["dilation"]) != (1, 1) or a["return_indices"]:
        raise UntraceableError("max_pool2d with a dilation or return_indices")
    return _window(w, a, "max_pool2d")


@op("interpolate", args=("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                         "antialias"), size=None, scale_factor=None, mode="nearest", align_corners=None,
    recompute_scale_factor=None, antialias=False)
def _interpolate(w, a):
    """By an integer scale factor, nearest or bilinear (a size, antialiasing or other modes: an extern)."""
    factor = a["scale_factor"]
    if a["size"] is not None or a["antialias"] or a["mode"] not in ("nearest", "bilinear") \
            or isinstance(factor, (list, tuple)) or not isinstance(factor, (int, float)) \
            or isinstance(factor, bool) or factor != int(factor) or factor < 1:
        raise UntraceableError("interpolate other than by an integer scale_factor, nearest or bilinear")
    corners = bool(a["align_corners"]) and a["mode"] == "bilinear"
    return (f"interpolate({w.text(a['input'])}, scale_factor={int(factor)}, mode={a['mode']}, "
            f"align_corners={w.attr(corners)})")


@op("grid_sample", args=("input", "grid", "mode", "padding_mode", "align_corners"), mode="bilinear",
    padding_mode="zeros", align_corners=None)
def _grid_sample(w, a):
    if a["mode"] not in ("bilinear", "nearest") or a["padding_mode"] not in ("zeros", "border", "reflection"):
        raise UntraceableError(f"grid_sample with mode={a['mode']!r}, padding_mode={a['padding_mode']!r}")
    return (f"grid_sample({w.text(a['input'])}, {w.text(a['grid'])}, mode={a['mode']}, "
            f"padding_mode={a['padding_mode']}, align_corners={w.attr(bool(a['align_corners']))})")


# torch and torch.nn.functional functions, operator.* and the method names that mean the same canonical op
_ALIASES = {
    "truediv": "div", "true_divide": "div", "divide": "div", "multiply": "mul", "subtract": "sub",
    "negative": "neg", "greater": "gt", "greater_equal": "ge", "less": "lt", "less_equal": "le",
    "not_equal": "ne", "absolute": "abs",
}


def _functions() -> dict[Any, str]:
    out: dict[Any, str] = {}
    names = set(OPS) | set(_ALIASES)
    for name in sorted(names):
        canonical = _ALIASES.get(name, name)
        for space in ONLY_IN.get(name, SPACES):
            fn = getattr(space, name, None)
            if callable(fn) and not isinstance(fn, type):
                out.setdefault(fn, canonical)
    out[operator.neg] = "neg"
    out[operator.getitem] = "getitem"
    out[torch.Tensor.__getitem__] = "getitem"
    return out


FUNCTIONS = _functions()
METHODS = {name: _ALIASES.get(name, name) for name in (*OPS, *_ALIASES)}

# the ops that may read an int / bool argument (an index or a mask): the indexing ones and shape ops on it
INDEX_OPS = frozenset({"gather", "index_select", "embedding", "where", "masked_fill", "getitem", "reshape", "flatten",
                       "unsqueeze", "permute", "transpose", "t", "T", "mT", "identity", "to", "type", "contiguous",
                       "clone"})

# the fx ops that compute Python values from shapes (never from a tensor's contents)
SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel"})
SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
PYTHON_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                              operator.getitem, operator.neg, builtins.len, builtins.int, builtins.getattr})


# --------------------------------------------------------------------------- modules


def _pair(value: Any) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _conv_options(m: nn.Module, transposed: bool) -> dict[str, Any]:
    if m.groups != 1 or _pair(m.dilation) != (1, 1) or m.padding_mode != "zeros":
        raise UntraceableError(f"{type(m).__name__} with groups, dilation or padding_mode other than the default")
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif all(k % 2 == 1 for k in _pair(m.kernel_size)):
            padding = tuple(k // 2 for k in _pair(m.kernel_size))
        else:
            raise UntraceableError(f"{type(m).__name__} with padding='same' and an even kernel")
    options = {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride), "padding": _pair(padding)}
    if transposed:
        options["output_padding"] = _pair(m.output_padding)
    return options


def _linear_module(w, m: nn.Linear) -> str:
    return w.module_decl(f"Linear({m.in_features}, {m.out_features}{'' if m.bias is not None else ', bias=false'})")


def _conv_module(w, m) -> str:
    transposed = isinstance(m, nn.ConvTranspose2d)
    o = _conv_options(m, transposed)
    parts = [str(m.in_channels), str(m.out_channels), w.attr(o["kernel"])]
    defaults = {"stride": (1, 1), "padding": (0, 0), "output_padding": (0, 0)}
    parts += [f"{k}={w.attr(v)}" for k, v in o.items() if k != "kernel" and v != defaults[k]]
    if m.bias is None:
        parts.append("bias=false")
    return w.module_decl(f"{'ConvTranspose2d' if transposed else 'Conv2d'}({', '.join(parts)})")


def _group_norm_module(w, m: nn.GroupNorm) -> str:
    extra = ("" if m.eps == 1e-5 else f", eps={w.number(m.eps)}") + ("" if m.affine else ", affine=false")
    return w.module_decl(f"GroupNorm({m.num_groups}, {m.num_channels}{extra})")


def _layer_norm_module(w, m: nn.LayerNorm) -> str:
    if m.elementwise_affine and m.bias is None:
        raise UntraceableError("LayerNorm with a weight and no bias")
    dims = tuple(m.normalized_shape)
    extra = ("" if m.eps == 1e-5 else f", eps={w.number(m.eps)}") + ("" if m.elementwise_affine else ", affine=false")
    return w.module_decl(f"LayerNorm({w.attr(dims[0] if len(dims) == 1 else dims)}{extra})")


def _embedding_module(w, m: nn.Embedding) -> str:
    if m.padding_idx is not None or m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
        raise UntraceableError("Embedding with padding_idx, max_norm, scale_grad_by_freq or sparse")
    return w.module_decl(f"Embedding({m.num_embeddings}, {m.embedding_dim})")


# a module with weights: declared as a param; the handler returns the declaration's type text
WEIGHTED_MODULES: dict[type, Callable] = {
    nn.Linear: _linear_module, nn.Conv2d: _conv_module, nn.ConvTranspose2d: _conv_module,
    nn.GroupNorm: _group_norm_module, nn.LayerNorm: _layer_norm_module, nn.Embedding: _embedding_module,
}

# a module without weights: the canonical op and its arguments from the module's attributes
ACTIVATION_MODULES: dict[type, Callable[[nn.Module], tuple[str, dict[str, Any]]]] = {
    nn.ReLU: lambda m: ("relu", {}), nn.Tanh: lambda m: ("tanh", {}), nn.Sigmoid: lambda m: ("sigmoid", {}),
    nn.SiLU: lambda m: ("silu", {}), nn.Identity: lambda m: ("identity", {}),
    nn.GELU: lambda m: ("gelu", {"approximate": m.approximate}),
    nn.ELU: lambda m: ("elu", {"alpha": m.alpha}),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"negative_slope": m.negative_slope}),
    nn.Softplus: lambda m: ("softplus", {"beta": m.beta, "threshold": m.threshold}),
    nn.Hardtanh: lambda m: ("hardtanh", {"min_val": m.min_val, "max_val": m.max_val}),
    nn.Flatten: lambda m: ("flatten", {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    nn.Unflatten: lambda m: ("reshape", {}),
    nn.Softmax: lambda m: ("softmax", {"dim": m.dim}),
    nn.LogSoftmax: lambda m: ("log_softmax", {"dim": m.dim}),
    nn.Dropout: lambda m: ("dropout", {"p": m.p, "training": m.training}),
}
ACTIVATION_MODULES[nn.ReLU6] = lambda m: ("relu6", {})
