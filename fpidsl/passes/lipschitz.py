"""A static upper bound of the Lipschitz constant of a layer's map g in each state (``fpidsl check --lipschitz``;
the report, which needs the initial weights of a compiled layer, is :mod:`fpidsl.lipschitz_report`).

Bounds propagate through the graph, one number per node: how much the node can change per unit change of
the state (in the 2-norm). States start at 1, everything else at 0; each primitive declares its rule in the
primitive table (a linear map
multiplies by the spectral norm of its initial weight, computed exactly from its singular values; a 1-Lipschitz
activation keeps the bound; a sum of two terms adds their bounds; an argument broadcast to more elements is
multiplied by the root of how many times each of its elements is repeated). Where no finite rule applies
(``exp``, a product of two state-dependent values, the gradient of an energy, a state-dependent value broadcast
along a symbolic dimension), the bound is reported as unknown with the reason.

A layer with several states has one bound per pair (update i, state j); the bound of g in state j is the root
of the sum of squares of column j (every update moves when x_j does), and the bound of g in all its states
together, which is what the iterations' convergence needs, is the spectral norm of that matrix of bounds.
It is a bound for the *initial* weights: training changes them (``norm=spectral`` keeps them bounded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..ir.graph import LayerGraph
from ..ir.primitives import PRIMITIVES
from ..ir.shapes import fmt_dim

INF = math.inf

@dataclass(frozen=True)
class Bound:
    """The bound of g in one state: ``value`` (``inf`` when unknown) and why it is unknown. With ``joint``, the
    bound of g in all the layer's states together (``state`` then lists them, ``"x, y together"``)."""

    state: str
    value: float
    reason: str | None = None
    joint: bool = False


def spectral_norm(matrix) -> float:
    """The largest singular value of a 2-D tensor, from its singular values in float64 (power iteration from a
    fixed start approaches it from below, and stalls when that start is orthogonal to its singular vector: an
    upper bound must not be estimated so)."""
    import torch

    w = matrix.detach().double()
    if w.numel() == 0:
        return 0.0
    return float(torch.linalg.svdvals(w)[0]) * (1 + 1e-12)


def _weight_norm(graph: LayerGraph, weights: dict, nid: str) -> float:
    """The operator norm of a linear, conv or transposed-conv call's weight (an upper bound for convs:
    the sum over kernel taps of each tap's spectral norm)."""
    prim = graph.node(nid)["prim"]
    source = graph.args(nid)[1]
    data = graph.node(source)
    if data["op"] == "call" and data["prim"] == "reshape" and graph.args(source)[0] in weights:
        weight = weights[graph.args(source)[0]].reshape(data["attrs"]["shape"])  # a Conv1d's [out, in, k]
    elif source in weights:
        weight = weights[source]
    else:
        return INF  # a weight computed from params (conv2d(x, 0.5 * W)): no norm without evaluating it
    if prim == "linear":
        return spectral_norm(weight)
    taps = weight.flatten(2).permute(2, 0, 1)  # (kh*kw, out, in) or (kh*kw, in, out)
    return sum(spectral_norm(tap) for tap in taps)


def _sup(graph: LayerGraph, weights: dict, nid: str) -> float:
    """sup |value| of a node that does not depend on the state, where it is known without data."""
    data = graph.node(nid)
    if data["op"] == "const":
        return abs(float(data["value"]))
    if data["op"] == "param":
        return float(weights[nid].abs().max())
    return INF


def bound_layer(graph: LayerGraph, weights: dict) -> list[Bound]:
    """The Lipschitz bound of g in each state (all of g's updates, the other states held fixed), then, for a
    layer with several states, the bound in all of them together (``joint``). ``weights``: param node ->
    tensor."""
    out = []
    matrix = []  # matrix[j][i]: the bound of update i in state j
    for state in graph.states:
        value, reason = _bound_in(graph, weights, graph.states[state].node)
        column = [value[graph.args(info.update)[0]] for info in graph.states.values()]
        why = next((reason[graph.args(info.update)[0]] for info in graph.states.values()
                    if reason.get(graph.args(info.update)[0])), None)
        worst = math.sqrt(sum(v * v for v in column))
        matrix.append(column)
        out.append(Bound(state, worst, why if worst == INF else None))
    if len(out) > 1:
        worst = _joint(matrix)
        why = next((b.reason for b in out if b.reason), None)
        out.append(Bound(", ".join(graph.states) + " together", worst, why if worst == INF else None, joint=True))
    return out


def _joint(matrix: list[list[float]]) -> float:
    """|g(x) - g(y)| <= |M d| with d_j = |x_j - y_j|, M[i][j] the bound of update i in state j: the spectral
    norm of M bounds g in all states together."""
    import torch

    if any(v == INF or math.isnan(v) for column in matrix for v in column):
        return INF
    return spectral_norm(torch.tensor(matrix, dtype=torch.float64))


def _bound_in(graph: LayerGraph, weights: dict, state_node: str) -> tuple[dict, dict]:
    value: dict[str, float] = {}
    reason: dict[str, str | None] = {}
    for nid in graph.nodes():
        data = graph.node(nid)
        args = graph.args(nid)
        if data["op"] != "call":
            value[nid] = 1.0 if nid == state_node else (value[args[0]] if args else 0.0)
            reason[nid] = reason.get(args[0]) if args else None
            continue
        ls = [value[a] for a in args]
        why = next((reason[a] for a in args if reason.get(a)), None)
        v, r = _rule(graph, weights, nid, ls)
        value[nid], reason[nid] = v, (r or why) if v == INF else None
    return value, reason


def _rule(graph: LayerGraph, weights: dict, nid: str, ls: list[float]) -> tuple[float, str | None]:
    """The bound of one call from its arguments' bounds ``ls``, by the rule its primitive declares."""
    data = graph.node(nid)
    prim = PRIMITIVES[data["prim"]]
    if all(v == 0 for v in ls):
        return 0.0, None
    where = f"{prim.name} at {data['span'].line}:{data['span'].col}"
    if data["prim"] == "mean":
        value, why = _mean(graph, nid, ls)
    elif isinstance(prim.lipschitz, float):
        value, why = prim.lipschitz * ls[0], None
    elif prim.lipschitz is None:
        return INF, f"{where} has no Lipschitz rule"
    else:
        value, why = RULES[prim.lipschitz](graph, weights, nid, ls, where)
    if math.isnan(value):  # 0 * inf: an exactly zero factor (a zero weight) times an unbounded value is constant
        return 0.0, None
    return value, why


def _reduced_sizes(graph: LayerGraph, nid: str) -> list:
    """The sizes that a reduction node (``sum``, ``mean`` ...) reduces over."""
    shape = graph.shape(graph.args(nid)[0])
    dim = graph.node(nid)["attrs"].get("dim")
    dims = range(len(shape)) if dim is None else (dim if isinstance(dim, tuple) else (dim,))
    return [shape[d] for d in dims]


def _mean(graph, nid, ls):
    """mean over n elements: each output moves by at most the root mean square of its n inputs' changes, so the
    bound is 1 / sqrt(n) for the known sizes (a symbolic size counts as 1 here; it cancels where the mean is
    broadcast back along it, see :func:`_spread`)."""
    known = math.prod(s for s in _reduced_sizes(graph, nid) if isinstance(s, int))
    return ls[0] / math.sqrt(known) if known else ls[0], None


def _mean_behind(graph: LayerGraph, nid: str) -> str | None:
    """The ``mean`` node that ``nid`` is a function of alone, back through calls of one argument (``unsqueeze``,
    ``tanh``) and calls whose other arguments are numbers or params (``0.5 * m``), or None: ``nid`` depends on
    the state only through it, so its bound is the mean's times the Lipschitz constant of the map between."""
    while graph.node(nid)["op"] == "call":
        if graph.node(nid)["prim"] == "mean":
            return nid
        args = graph.args(nid)
        moving = [a for a in args if graph.node(a)["op"] not in ("const", "param")]
        if len(moving) != 1 or PRIMITIVES[graph.node(nid)["prim"]].dtype_from_state:
            return None
        nid = moving[0]
    return None


def _spread(graph: LayerGraph, nid: str, arg: str, where: str) -> tuple[float, str | None]:
    """The factor by which broadcasting ``arg`` to the shape of ``nid`` multiplies its bound: the root of how many
    copies of each element the result holds (``x[:, 0:1] + z`` with z ``[B, 8]``: sqrt(8)). A symbolic copy count
    has no static bound, except where ``arg`` is a function of a ``mean`` over that symbolic dimension alone
    (:func:`_mean_behind`): a mean over n elements spread to n places moves no more than its input."""
    arg_shape, out_shape = graph.shape(arg), graph.shape(nid)
    copies = []
    for i in range(1, len(out_shape) + 1):
        size = out_shape[-i]
        mine = arg_shape[-i] if i <= len(arg_shape) else 1
        if mine == 1 and size != 1:
            copies.append(size)
    known = math.prod(c for c in copies if isinstance(c, int))
    symbolic = [fmt_dim(c) for c in copies if not isinstance(c, int)]
    if symbolic:
        source = _mean_behind(graph, arg)
        if source is not None:
            for size in _reduced_sizes(graph, source):
                if not isinstance(size, int) and fmt_dim(size) in symbolic:
                    symbolic.remove(fmt_dim(size))
    if symbolic:
        return INF, (f"{where}: a value that depends on the state is broadcast along the symbolic dimension "
                     f"{symbolic[0]} (each of its elements used {symbolic[0]} times)")
    return math.sqrt(known), None


def _spread_all(graph, nid, ls, where) -> tuple[list[float], str | None]:
    """Each argument's bound times its broadcasting factor (:func:`_spread`); the reason of the first that has
    no bound."""
    out, why = [], None
    for arg, bound in zip(graph.args(nid), ls):
        if bound == 0:
            out.append(0.0)
            continue
        factor, reason = _spread(graph, nid, arg, where)
        out.append(factor * bound)
        why = why or reason
    return out, why


def _weight_rule(graph, weights, nid, ls, where):
    if ls[1:] != [0.0] * len(ls[1:]):
        return INF, f"{where}: its weight depends on the state"
    norm = _weight_norm(graph, weights, nid)
    if norm == INF:
        return INF, f"{where}: a weight whose norm is unknown statically (computed from params, not a param itself)"
    return norm * ls[0], None


def _sum_of_args(graph, weights, nid, ls, where):
    """a + b, a - b, minimum, maximum: the bounds (each times its broadcasting factor) add."""
    ls, why = _spread_all(graph, nid, ls, where)
    return sum(ls), why if sum(ls) == INF else None


def _product(graph, weights, nid, ls, where):
    args = graph.args(nid)
    ls, spread_why = _spread_all(graph, nid, ls, where)
    if INF in ls and spread_why:
        return INF, spread_why
    if ls[0] and ls[1]:
        return INF, f"{where}: a product of two values that both depend on the state"
    fixed, moving = (args[0], ls[1]) if ls[0] == 0 else (args[1], ls[0])
    sup = _sup(graph, weights, fixed)
    return (sup * moving, None) if sup < INF else (INF, f"{where}: a factor whose magnitude is unknown statically "
                                                         "(computed, not a param or a number)")


def _divide(graph, weights, nid, ls, where):
    args = graph.args(nid)
    ls, spread_why = _spread_all(graph, nid, ls, where)
    if INF in ls and spread_why:
        return INF, spread_why
    if ls[1]:
        return INF, f"{where}: division by a value that depends on the state"
    data = graph.node(args[1])
    if data["op"] == "const" and float(data["value"]) != 0:
        return ls[0] / abs(float(data["value"])), None
    return INF, f"{where}: division by a value whose magnitude is unknown statically (not a nonzero number)"


def _matmul(graph, weights, nid, ls, where):
    args = graph.args(nid)
    if ls[0] and ls[1]:
        return INF, f"{where}: a product of two values that both depend on the state"
    matrix = _fixed_matrix(graph, weights, args[1] if ls[0] else args[0])
    if matrix is not None:
        return spectral_norm(matrix) * max(ls), None
    return INF, f"{where}: a matrix whose norm is unknown statically (computed from params, not a param itself)"


def _fixed_matrix(graph, weights, nid):
    """The value of a 2-D param, possibly transposed, else None."""
    data = graph.node(nid)
    if data["op"] == "param" and weights[nid].dim() == 2:
        return weights[nid]
    if data["op"] == "call" and data["prim"] == "transpose":
        inner = _fixed_matrix(graph, weights, graph.args(nid)[0])
        return None if inner is None else inner.T
    return None


def _sum(graph, weights, nid, ls, where):
    l_in = ls[0]
    sizes = _reduced_sizes(graph, nid)
    if all(isinstance(s, int) for s in sizes):
        return math.sqrt(math.prod(sizes)) * l_in, None
    return INF, f"{where}: a sum over a symbolic dimension"


def _slope(attr: str):
    def rule(graph, weights, nid, ls, where):
        return max(1.0, abs(graph.node(nid)["attrs"][attr])) * ls[0], None
    return rule


def _window_overlap(graph, weights, nid, ls, where):
    """max_pool2d: each input is in at most ceil(kh / sh) * ceil(kw / sw) windows, and a window's maximum moves
    at most as much as its largest change, so the bound is the root of that count."""
    attrs = graph.node(nid)["attrs"]
    kernel = attrs["kernel"]
    stride = attrs["stride"] or kernel
    return math.sqrt(math.prod(-(-k // s) for k, s in zip(kernel, stride))) * ls[0], None


def _resampling(graph, weights, nid, ls, where):
    """interpolate: nearest by an integer scale s copies each input to s * s places (a factor s); other
    resamplings have no static rule here."""
    attrs = graph.node(nid)["attrs"]
    if attrs["mode"] == "nearest" and attrs["scale_factor"] is not None:
        return float(attrs["scale_factor"]) * ls[0], None
    return INF, f"{where}: {attrs['mode']} resampling to a size has no static Lipschitz rule"


def _normalization(graph, weights, nid, ls, where):
    """group_norm / layer_norm: ``u / sqrt(|u|^2 / n + eps)`` of the centred group ``u`` has a Jacobian of norm at
    most ``1 / s <= 1 / sqrt(eps)`` (``1 / s`` across ``u``, ``eps / s^3`` along it, ``s = sqrt(|u|^2 / n + eps)``;
    centring has norm 1), the weight scales it by at most ``max |W|``, the bias adds nothing."""
    if any(ls[1:]):
        return INF, f"{where}: its weight or bias depends on the state"
    args = graph.args(nid)
    scale = _sup(graph, weights, args[1]) if len(args) > 1 else 1.0
    if scale == INF:
        return INF, f"{where}: a weight whose magnitude is unknown statically (computed, not a param)"
    return scale / math.sqrt(graph.node(nid)["attrs"]["eps"]) * ls[0], None


# The rules that primitives name in their ``lipschitz`` entry (fpidsl/ir/primitives.py).
RULES: dict[str, Callable[..., tuple[float, str | None]]] = {
    "sum_of_args": _sum_of_args,
    "root_sum_squares": lambda graph, weights, nid, ls, where: (math.sqrt(sum(v * v for v in ls)), None),
    "leaky_relu": _slope("slope"),
    "elu": _slope("alpha"),
    "weight_norm": _weight_rule,
    "product": _product,
    "quotient": _divide,
    "matrix_product": _matmul,
    "sum_reduction": _sum,
    "dropout": lambda graph, weights, nid, ls, where: (ls[0] / (1 - graph.node(nid)["attrs"]["p"]), None),
    "window_overlap": _window_overlap,
    "repeated_index": lambda graph, weights, nid, ls, where: (
        INF, f"{where}: the bound is the root of how often the index repeats an entry, known only at call time"),
    "resampling": _resampling,
    "unbounded": lambda graph, weights, nid, ls, where: (INF, f"{where} is not globally Lipschitz"),
    "normalization": _normalization,
    "sparse_operator": lambda graph, weights, nid, ls, where: (
        INF, f"{where} multiplies by a sparse input, whose norm is known only at call time"),
    "curvature": lambda graph, weights, nid, ls, where: (
        INF, f"{where}: the gradient of an energy needs a curvature bound, which the static check does not have "
             "(try a smaller step)"),
}
