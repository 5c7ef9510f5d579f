"""Sample mixing: which axis of each value runs over the samples of the batch, from each primitive's declared rule.

A fixed-point layer may drop finished samples from the work only when g treats the samples independently.
That is decided here by a forward dataflow analysis over the graph, never from how an index is spelled:
every value gets a *batch axis*

* ``None``: the value does not depend on the samples (params, consts, what is made from them only);
* an ``int`` k: sample i of the value is its slice i along axis k, and it depends on sample i alone;
* :data:`MIXED`: some part of the value depends on more than one sample (a reduction or a slice along the
  batch, a contraction over it, an outer product of two batched values ...), or the analysis cannot tell.

Leaves: states, and inputs whose first declared dimension is the states' batch symbol, are batched on axis 0;
a leaf that carries the batch symbol anywhere else is :data:`MIXED`. Every primitive of
:data:`~fpidsl.ir.primitives.PRIMITIVES` declares its rule (``Primitive.batch``, one of the rule factories
below): ``rule(axes, shapes, out_shape, attrs) -> axis``, with ``axes``/``shapes`` per argument. A rule that is
unsure answers :data:`MIXED`: a map wrongly judged mixing is only solved jointly (slower), while a map wrongly
judged samplewise gives wrong fixed points.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Sequence


class _Mixed:
    def __repr__(self) -> str:
        return "MIXED"


MIXED: Any = _Mixed()

Axis = Any  # None | int | MIXED
BatchRule = Callable[[Sequence[Axis], Sequence[tuple], tuple, Mapping[str, Any]], Axis]


def _agree(candidates: Iterable[Axis]) -> Axis:
    """The one axis all batched operands put the samples on, else MIXED; None when none is batched."""
    found: set = set()
    for c in candidates:
        if c is MIXED:
            return MIXED
        if c is not None:
            found.add(c)
    if len(found) > 1:
        return MIXED
    return next(iter(found)) if found else None


def _of_the_operand(rule):
    """A rule of the first operand's batch axis ``a`` (an int): a sample-free or mixed operand passes through."""
    @functools.wraps(rule)
    def wrapped(axes, shapes, out, attrs):
        a = axes[0]
        return a if a is None or a is MIXED else rule(a, shapes, out, attrs)
    return wrapped


def _norm(d: int, rank: int) -> int | None:
    return d % rank if rank and -rank <= d < rank else None


# --------------------------------------------------------------------------- rule factories

def elementwise() -> BatchRule:
    """Broadcasting element-wise operations (and one-operand ones): operands aligned from the right; every
    batched operand must put its samples on the same result axis."""
    def rule(axes, shapes, out, attrs):
        return _agree(None if a is None else (MIXED if a is MIXED else a + len(out) - len(s))
                      for a, s in zip(axes, shapes))
    return rule


def like(position: int, data: Sequence[int] = (0,)) -> BatchRule:
    """A result shaped like argument ``position`` (read for its shape only) and built element-wise from the
    ``data`` arguments broadcast to that shape (``expand_as``, ``ones_like``)."""
    def rule(axes, shapes, out, attrs):
        cands = [axes[position]] if axes[position] is not None else []
        for i in data:
            a = axes[i]
            cands.append(None if a is None else (MIXED if a is MIXED else a + len(out) - len(shapes[i])))
        return _agree(cands)
    return rule


def reduction(dim_attr: str = "dim", keep_attr: str | None = "keepdim") -> BatchRule:
    """Reduces the dims ``attrs[dim_attr]`` (None: all): mixing when the batch axis is one of them."""
    @_of_the_operand
    def rule(a, shapes, out, attrs):
        rank = len(shapes[0])
        dims = attrs.get(dim_attr)
        listed = range(rank) if dims is None else (dims if isinstance(dims, tuple) else (dims,))
        picked = {_norm(d, rank) for d in listed}
        if None in picked or a in picked:
            return MIXED
        keep = bool(attrs.get(keep_attr)) if keep_attr else False
        return a if keep else a - sum(1 for d in picked if d < a)
    return rule


def along(dim_attr: str = "dim") -> BatchRule:
    """Works along one dimension and keeps the shape (``softmax``): mixing along the batch axis."""
    @_of_the_operand
    def rule(a, shapes, out, attrs):
        return MIXED if _norm(attrs[dim_attr], len(shapes[0])) in (None, a) else a
    return rule


def concatenation() -> BatchRule:
    """``cat``: joining along the batch axis mixes; the batched pieces must agree on their axis."""
    def rule(axes, shapes, out, attrs):
        joined = _agree(axes)
        if joined is None or joined is MIXED:
            return joined
        if any(a is None for a in axes):  # a sample-free piece sized by the batch: cannot be told apart
            return MIXED
        return MIXED if _norm(attrs["dim"], len(out)) == joined else joined
    return rule


def _prefix_kept(a: int, src: tuple, dst: tuple) -> bool:
    return len(dst) > a and tuple(src[:a + 1]) == tuple(dst[:a + 1])


def reshaping(like_position: int | None = None) -> BatchRule:
    """``reshape``/``reshape_as``: the batch axis survives when every dimension up to it is unchanged."""
    def rule(axes, shapes, out, attrs):
        a = axes[0]
        if like_position is not None and axes[like_position] is not None:
            if a is None or axes[like_position] != a:
                return MIXED
        if a is None or a is MIXED:
            return a
        return a if _prefix_kept(a, shapes[0], out) else MIXED
    return rule


def transposing() -> BatchRule:
    @_of_the_operand
    def rule(a, shapes, out, attrs):
        rank = len(shapes[0])
        d0, d1 = _norm(attrs["dim0"], rank), _norm(attrs["dim1"], rank)
        return d1 if a == d0 else d0 if a == d1 else a
    return rule


def flattening() -> BatchRule:
    @_of_the_operand
    def rule(a, shapes, out, attrs):
        rank = len(shapes[0])
        if rank == 0:
            return MIXED
        s, e = _norm(attrs["start"], rank), _norm(attrs["end"], rank)
        if a < s:
            return a
        if a > e:
            return a - (e - s)
        return a if s == e else MIXED
    return rule


def _index_items(items: tuple, rank: int) -> list:
    """The index expanded to one item per dimension of the indexed value (Ellipsis and the tail filled);
    a ``None`` item (a new size-1 dimension) stays in place and reads no dimension."""
    from .primitives import SliceSpec

    explicit = sum(1 for it in items if it is not Ellipsis and it is not None)
    out: list = []
    for it in items:
        if it is Ellipsis:
            out.extend([SliceSpec()] * (rank - explicit))
        else:
            out.append(it)
    return out + [SliceSpec()] * (rank - sum(1 for it in out if it is not None))


def _index_positions(items: list) -> list[tuple]:
    """For each expanded item: (item, the dimension of the indexed value it reads or None, the dimension
    of the result it makes or None). An integer reads one and makes none, ``None`` makes one and reads none."""
    out, i, j = [], 0, 0
    for it in items:
        reads = None if it is None else i
        makes = None if isinstance(it, int) and not isinstance(it, bool) else j
        out.append((it, reads, makes))
        i += reads is not None
        j += makes is not None
    return out


def _full(item) -> bool:
    from .primitives import SliceSpec

    return isinstance(item, SliceSpec) and item == SliceSpec()


def indexing(data: int = 0, like_position: int | None = None) -> BatchRule:
    """``x[index]`` (and ``index_backward``, which places a cotangent at ``like[index]``): the samples stay
    apart only when the batch axis is taken whole (``:``); any integer or partial slice on it selects
    among the samples. Integers before the batch axis remove dimensions and move it left; ``None`` items
    (new size-1 dimensions) before it move it right."""
    def rule(axes, shapes, out, attrs):
        full_rank_position = like_position if like_position is not None else data
        rank = len(shapes[full_rank_position])
        positions = _index_positions(_index_items(tuple(attrs["index"]), rank))
        by_input = {reads: (it, makes) for it, reads, makes in positions if reads is not None}
        by_result = {makes: (it, reads) for it, reads, makes in positions if makes is not None}
        if like_position is None:  # forward: axis in x -> axis in the result
            a = axes[data]
            if a is None or a is MIXED:
                return a
            it, makes = by_input[a]
            return makes if _full(it) else MIXED
        # backward: ct lives on the result's dims; like is read for its shape
        ct_axis = axes[data]
        cands = [axes[like_position]]
        if ct_axis is MIXED:
            return MIXED
        if ct_axis is not None:
            it, full_axis = by_result[ct_axis]
            if full_axis is None or not _full(it):  # the samples along a new size-1 dim, or a selection
                return MIXED
            cands.append(full_axis)
        elif axes[like_position] is not None and not _full(by_input[axes[like_position]][0]):
            return MIXED
        return _agree(cands)
    return rule


def unsqueezing() -> BatchRule:
    """``unsqueeze``: size-1 dims inserted at positions of the result (negative ones count from its end)."""
    @_of_the_operand
    def rule(a, shapes, out, attrs):
        dims = attrs["dim"] if isinstance(attrs["dim"], tuple) else (attrs["dim"],)
        inserted = {_norm(d, len(out)) for d in dims}
        positions = [i for i in range(len(out)) if i not in inserted]
        return positions[a]
    return rule


def permuting(dims_attr: str = "dims") -> BatchRule:
    """``permute``: the batch axis goes where the order puts it."""
    @_of_the_operand
    def rule(a, shapes, out, attrs):
        dims = attrs[dims_attr] if isinstance(attrs[dims_attr], tuple) else (attrs[dims_attr],)
        order = [_norm(d, len(shapes[0])) for d in dims]
        return order.index(a) if a in order else MIXED
    return rule


def matrix_product() -> BatchRule:
    """``a @ b``: the samples must not run along a contracted dimension; batch dims broadcast."""
    def rule(axes, shapes, out, attrs):
        (aa, ab), (sa, sb) = axes, shapes
        ra, rb = len(sa), len(sb)
        # the result is [*batch dims, rows of a (when a is 2-D or more), columns of b (when b is)]
        rows_at = len(out) - (2 if rb >= 2 else 1)  # the position of a's rows in the result
        cols_at = len(out) - 1                      # b's columns
        cands = []
        if aa is not None:
            if aa is MIXED or ra < 2 or aa == ra - 1:  # a vector, or a's contracted columns
                return MIXED
            cands.append(rows_at if aa == ra - 2 else rows_at - (ra - 2) + aa)
        if ab is not None:
            if ab is MIXED or rb < 2 or ab == rb - 2:  # a vector, or b's contracted rows
                return MIXED
            batch_dims = cols_at - (1 if ra >= 2 else 0)
            cands.append(cols_at if ab == rb - 1 else batch_dims - (rb - 2) + ab)
        return _agree(cands)
    return rule


def per_row(data: int = 0, row_rank: int = 1, shape_only: Sequence[int] = ()) -> BatchRule:
    """Operations that act on the trailing ``row_rank`` dims of argument ``data`` with sample-free other
    arguments (``linear``: 1 trailing dim; the convolutions: channels and space, 3 trailing dims): the batch
    axis must lie in the leading dims and keeps its place. ``shape_only`` arguments are read for their shape
    and must agree. Any other batched argument (a batched weight) mixes."""
    def rule(axes, shapes, out, attrs):
        for i, a in enumerate(axes):
            if i != data and i not in shape_only and a is not None:
                return MIXED
        a = axes[data]
        if a is MIXED:
            return MIXED
        if a is not None and a >= len(shapes[data]) - row_rank:
            return MIXED
        return _agree([a] + [axes[i] for i in shape_only])
    return rule


def normalizing(trailing: Callable[[int, Mapping[str, Any]], int]) -> BatchRule:
    """Normalisations (``group_norm``, ``layer_norm``): argument 0 is normalized over its last
    ``trailing(rank, attrs)`` dims, with sample-free weight and bias. Per-sample when the batch axis lies in
    the leading dims (it keeps its place); mixing when it is normalized over or a weight is batched."""
    def rule(axes, shapes, out, attrs):
        return per_row(row_rank=trailing(len(shapes[0]), attrs))(axes, shapes, out, attrs)
    return rule


def constant() -> BatchRule:
    """Constructors (``eye``, ``zeros`` ...): a value made from static sizes, sample-free; one sized by a
    symbolic dimension (the batch, maybe) cannot be told apart from a batched value, so it counts as mixing."""
    def rule(axes, shapes, out, attrs):
        return None if all(isinstance(d, int) for d in out) else MIXED
    return rule


def counting(dim_attr: str = "dim") -> BatchRule:
    """``count(x, dim)``: how many elements a mean averages; it depends on the batch size only when the
    batch axis is among the averaged dims."""
    @_of_the_operand
    def rule(a, shapes, out, attrs):
        return None if reduction(dim_attr, None)([a], shapes, (), attrs) is not MIXED else MIXED
    return rule


def sample_free_result() -> BatchRule:
    """A result with no batch axis (a parameter gradient, an element count): mixing when any argument is
    batched (the sum runs over the samples)."""
    def rule(axes, shapes, out, attrs):
        return None if all(a is None for a in axes) else MIXED
    return rule


def cat_piece() -> BatchRule:
    """``cat_part(ct, *parts)``: the slice of ct that belongs to one piece; ct's batch axis unless that is the
    joined one."""
    def rule(axes, shapes, out, attrs):
        a = _agree(axes)
        if a is None or a is MIXED:
            return a
        return MIXED if _norm(attrs["dim"], len(shapes[0])) == a else a
    return rule


def solving() -> BatchRule:
    """``solve(A, b)``: every batch entry, and every column of a matrix right-hand side, is solved on its own;
    samples along A's rows or columns, or b's rows, mix (each unknown depends on all of them)."""
    from .linalg import solve_rhs_is_vector

    def rule(axes, shapes, out, attrs):
        (aa, ab), (sa, sb) = axes, shapes
        vector = solve_rhs_is_vector(len(sa), len(sb))
        batch_rank = len(out) - (1 if vector else 2)  # the broadcast batch dims lead the result
        cands = []
        if aa is not None:
            if aa is MIXED or aa >= len(sa) - 2:
                return MIXED
            cands.append(batch_rank - (len(sa) - 2) + aa)
        if ab is not None:
            b_batch = len(sb) - (1 if vector else 2)
            if ab is MIXED:
                return MIXED
            if not vector and ab == len(sb) - 1:  # the columns of b: independent right-hand sides
                cands.append(len(out) - 1)
            elif ab >= b_batch:
                return MIXED
            else:
                cands.append(batch_rank - b_batch + ab)
        return _agree(cands)
    return rule


def contracting(equation_attr: str = "equation") -> BatchRule:
    """``einsum``: an operand's batch axis names a letter (or a dim of its ``...``); the result carries the
    samples where the output writes that letter; a letter summed over (absent from the output) mixes."""
    from .linalg import ellipsis_rank, letters, parse

    def rule(axes, shapes, out, attrs):
        eq = parse(attrs[equation_attr])
        out_lead = len(out) - len(letters(eq.output))  # the output's `...` dims
        cands = []
        for a, shape, term in zip(axes, shapes, eq.operands):
            if a is None:
                continue
            if a is MIXED:
                return MIXED
            lead = ellipsis_rank(term, len(shape))
            if a < lead:  # a broadcast dim: aligned from the right with the output's `...`
                cands.append(out_lead - lead + a)
                continue
            letter = letters(term)[a - lead]
            if letter not in eq.output:
                return MIXED
            cands.append(out_lead + letters(eq.output).index(letter))
        return _agree(cands)
    return rule


def sparse_product() -> BatchRule:
    """``spmm(A, x)``: A's rows mix x's rows, so samples along x's rows (IGNN's nodes on one graph) mix; its
    columns are independent. A batched sparse A counts as mixing."""
    def rule(axes, shapes, out, attrs):
        aa, ax = axes
        if aa is not None or ax is MIXED or ax == 0:
            return MIXED
        return ax
    return rule


def gathering() -> BatchRule:
    """``gather(x, index)`` along ``attrs["dim"]`` (x and index of one rank, the result shaped like the index) and
    its adjoint ``gather_backward(ct, index, like)``: per sample when every batched argument has the samples on
    one axis other than dim."""
    def rule(axes, shapes, out, attrs):
        a = _agree(axes)
        if a is None or a is MIXED:
            return a
        return MIXED if _norm(attrs["dim"], len(out)) == a else a
    return rule


def selecting() -> BatchRule:
    """``index_select(x, index)`` along ``attrs["dim"]`` with a 1-D index, and its adjoint
    ``index_select_backward(ct, index, like)``: per sample when the index is sample-free and the samples run
    along another axis than dim."""
    def rule(axes, shapes, out, attrs):
        if axes[1] is not None:
            return MIXED
        a = _agree([axes[0], *axes[2:]])
        if a is None or a is MIXED:
            return a
        return MIXED if _norm(attrs["dim"], len(out)) == a else a
    return rule


def embedding() -> BatchRule:
    """``embedding(index, weight)``: a row of the (sample-free) weight per index; the index's batch axis."""
    def rule(axes, shapes, out, attrs):
        return MIXED if axes[1] is not None else axes[0]
    return rule


def spatial(row_rank: int | Callable[[Mapping[str, Any]], int] = 2) -> BatchRule:
    """Operations on the trailing ``row_rank`` dims of every argument (pooling, resampling, padding: 2 spatial
    dims; ``grid_sample``: 3, its grid being [N, H, W, 2]): per sample when every batched argument has the samples
    on one axis before those dims."""
    def rule(axes, shapes, out, attrs):
        rank = row_rank(attrs) if callable(row_rank) else row_rank
        for a, s in zip(axes, shapes):
            if a is not None and a is not MIXED and a >= len(s) - rank:
                return MIXED
        return _agree(axes)
    return rule


def unexpanded() -> BatchRule:
    """Primitives that a lowering pass replaces (``grad``): the analysis runs on the expanded graph."""
    def rule(axes, shapes, out, attrs):
        return MIXED
    return rule


def leading() -> BatchRule:
    """Every batched argument has its samples on axis 0, and so has the result (``dropout``: x and its per-sample
    seeds); anything else mixes."""
    def rule(axes, shapes, out, attrs):
        a = _agree(axes)
        return a if a is None or a is MIXED or a == 0 else MIXED
    return rule


def external() -> BatchRule:
    """An extern module (fpidsl/ir/extern.py: handle, parameters, inputs): one declared ``samplewise`` keeps sample i
    of its batched arguments (all on axis 0) in sample i of its result; any other with a batched argument mixes.
    Sample-free arguments give a sample-free result, unless it is sized by a symbolic dimension."""
    def rule(axes, shapes, out, attrs):
        joined = _agree(axes)
        if joined is None:
            return None if all(isinstance(d, int) for d in out) else MIXED
        if joined is MIXED:
            return joined
        return 0 if attrs["samplewise"] and joined == 0 else MIXED
    return rule


def external_vjp() -> BatchRule:
    """A VJP of an extern (``extern_vjp``) with respect to a batched argument is batched like it; with respect to a
    sample-free one (the parameters) it sums over the samples: mixing, unless nothing is batched."""
    base = external()

    def rule(axes, shapes, out, attrs):
        joined = base(axes, shapes, out, attrs)
        if joined is None or joined is MIXED:
            return joined
        return 0 if axes[attrs["chain"][-1]] == 0 else MIXED
    return rule


# --------------------------------------------------------------------------- the analysis

def batch_symbol(graph) -> str | None:
    """The states' shared leading dimension when it is symbolic (the batch), else None."""
    leads = {info.shape[0] if info.shape else None for info in graph.states.values()}
    if len(leads) != 1:
        return None
    lead = next(iter(leads))
    return lead if isinstance(lead, str) else None


def batch_axes(graph, roots: Iterable[str] | None = None) -> dict[str, Axis]:
    """The batch axis of every node that ``roots`` (default: the state updates) depend on."""
    from .primitives import PRIMITIVES

    batch = batch_symbol(graph)
    if roots is None:
        roots = [graph.args(graph.states[s].update)[0] for s in graph.states]
    roots = list(roots)
    live = set(graph.upstream_within(roots, set(graph.nodes()))) | set(roots)
    axes: dict[str, Axis] = {}
    for nid in graph.nodes():
        if nid not in live:
            continue
        data = graph.node(nid)
        op, shape = data["op"], tuple(data["shape"] or ())
        if op in ("state", "input", "param", "const"):
            if batch is None:
                axes[nid] = MIXED if op in ("state", "input") else None
            elif (op in ("state", "input") or data.get("role") == "seeds") and shape and shape[0] == batch \
                    and batch not in shape[1:]:  # seeds: dropout's, one per sample (fpidsl/ir/dropout.py)
                axes[nid] = 0
            else:
                axes[nid] = MIXED if batch in shape else None
            continue
        if op != "call":
            continue
        args = graph.args(nid)
        arg_axes = [axes[a] for a in args]
        if all(a is None for a in arg_axes) and batch not in shape:
            axes[nid] = None
            continue
        prim = PRIMITIVES[data["prim"]]
        axis = prim.batch(arg_axes, [tuple(graph.shape(a) or ()) for a in args], shape, data["attrs"])
        if axis is not MIXED and axis is not None and not (axis < len(shape) and shape[axis] == batch):
            axis = MIXED
        if axis is None and batch in shape:
            axis = MIXED
        axes[nid] = axis
    return axes


def samplewise(graph, extra_roots: Sequence[str] = ()) -> bool:
    """True when every state's update depends on its own sample alone, on axis 0 (so finished samples may be
    dropped from the work); ``graph`` has ``grad`` expanded. ``extra_roots`` (values handed across the hoist
    boundary) must also be sample-free or batched on axis 0."""
    if batch_symbol(graph) is None:
        return False
    roots = [graph.args(graph.states[s].update)[0] for s in graph.states]
    axes = batch_axes(graph, list(roots) + list(extra_roots))
    if any(a is MIXED for a in axes.values()):
        return False
    if any(axes[r] != 0 for r in roots):
        return False
    return all(axes[r] in (None, 0) for r in extra_roots)
