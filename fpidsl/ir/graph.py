"""The layer graph: one per ``layer`` block, a DAG of values over ``networkx.MultiDiGraph``.

Nodes are values with a closed set of ops (:data:`OPS`). Node ids are ``"n0", "n1", ...`` in insertion
order, and insertion order is a topological order (a node is added after its arguments). Edges run
from an argument to its user; the edge key and its ``pos`` attribute are the argument position, and
``span`` is where the argument is written at the use site (so errors about an argument point at it).
A multigraph because one value can be several arguments of the same node (``x * x``).

Node attributes (all nodes): ``op``, ``shape`` (tuple of dims, see :mod:`fpidsl.ir.shapes`; None
until :func:`~fpidsl.passes.infer_shapes.infer_shapes` has run or where it failed), ``span`` and
``name`` (the user's name for a named input/state/param/let/energy, else None). Per op:

* ``input``: its ``name``; ``state``: its ``name``;
* ``param``: ``name`` (``"fc.weight"`` / ``"fc.bias"`` for module params with ``module`` and ``role``;
  ``"w"`` for a raw tensor with ``init``, a :class:`TensorInit`);
* ``const``: ``value`` (an int or float; numbers and ``const`` declarations are inlined); shape ``()``;
* ``call``: ``prim`` (a key of :data:`~fpidsl.ir.primitives.PRIMITIVES`), ``attrs`` (dict of static
  attributes, defaults filled in), ``module`` (the param module a ``linear``/``conv`` call came from,
  else None), ``inlined`` (``(fn name, call-site span)`` when it came from an ``fn`` body, else None);
  for messages only, ``attr_spans`` (attribute -> where it is written) and, on ``index``, ``item_spans``;
* ``update``: ``state``; one argument, the new value; shape = the state's;
* ``init``: ``state``; either ``fill`` (a number: zeros=0, ones=1) and no argument, or ``fill=None`` and
  one argument (a warm-start expression over inputs and params); shape = the state's;
* ``output``: arguments 0..k-1, the layer's outputs; shape ``()``.

Spans of nodes made while inlining an ``fn`` point into the ``fn`` body (``inlined`` says where it was
called); an ``fn`` parameter used in the body is the call-site argument's node, with the argument's span
on the edge.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import networkx as nx

from ..source import Span
from .primitives import PRIMITIVES, format_attr
from .shapes import Dim, fmt_shape

OPS = frozenset({"input", "state", "param", "const", "call", "update", "init", "output"})
_ARITY = {"input": (0, 0), "state": (0, 0), "param": (0, 0), "const": (0, 0), "update": (1, 1),
          "init": (0, 1), "output": (0, None)}


class GraphLintError(AssertionError):
    """A broken graph invariant: a bug in fpidsl, never a user error."""


@dataclass(frozen=True)
class ModuleSpec:
    """A declared ``param NAME : Linear | Conv2d | ConvTranspose2d | GroupNorm | LayerNorm (...)``, for code
    generation.

    ``in_size``/``out_size``: features (Linear) or channels (convolutions, GroupNorm; for LayerNorm the
    number of normalized elements); ``kernel``, ``stride``, ``padding``, ``output_padding`` are (h, w) pairs
    (None for Linear). The normalisations: ``groups`` (GroupNorm), ``normalized`` (LayerNorm's dims),
    ``eps``, and ``bias`` says whether they are affine (a weight and a bias, or neither)."""

    kind: str
    in_size: int
    out_size: int
    kernel: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] | None = None
    output_padding: tuple[int, int] | None = None
    bias: bool = True
    init_scale: float | None = None
    norm: str | None = None
    span: Span | None = field(default=None, compare=False)
    groups: int | None = None
    normalized: tuple[int, ...] | None = None
    eps: float | None = None

    @property
    def prim(self) -> str:
        return {"Linear": "linear", "Conv2d": "conv2d", "ConvTranspose2d": "conv_transpose2d",
                "GroupNorm": "group_norm", "LayerNorm": "layer_norm", "Embedding": "embedding",
                "MultiheadAttention": "einsum", "Conv1d": "conv2d"}[self.kind]

    @property
    def is_normalization(self) -> bool:
        return self.kind in ("GroupNorm", "LayerNorm")

    @property
    def has_weight(self) -> bool:
        """Whether it has a param ``NAME.weight`` (attention's are ``in_proj_weight`` and ``out_proj.weight``)."""
        return self.kind != "MultiheadAttention" and (self.bias or not self.is_normalization)

    def bias_shape(self) -> tuple[int, ...]:
        return self.weight_shape() if self.is_normalization else (self.out_size,)

    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "MultiheadAttention":  # in_proj_weight: the q, k and v projections stacked
            return (3 * self.in_size, self.in_size)
        if self.kind == "Conv1d":  # kernel, stride and padding are kept as (1, k), (1, s), (0, p): conv2d's
            return (self.out_size, self.in_size, self.kernel[1])
        if self.kind == "GroupNorm":
            return (self.in_size,)
        if self.kind == "LayerNorm":
            return tuple(self.normalized)
        if self.kind == "Linear":
            return (self.out_size, self.in_size)
        if self.kind == "Embedding":  # in_size: the number of rows (indices), out_size: their dimension
            return (self.in_size, self.out_size)
        if self.kind == "Conv2d":
            return (self.out_size, self.in_size) + tuple(self.kernel)
        return (self.in_size, self.out_size) + tuple(self.kernel)

    def attrs(self) -> dict[str, Any]:
        """The static attributes of the call nodes this module lowers to."""
        if self.kind in ("Linear", "Embedding"):
            return {}
        if self.kind == "GroupNorm":
            return {"groups": self.groups, "channels": self.in_size, "eps": self.eps}
        if self.kind == "LayerNorm":
            return {"shape": tuple(self.normalized), "eps": self.eps}
        out = {"stride": self.stride, "padding": self.padding}
        if self.kind == "ConvTranspose2d":
            out["output_padding"] = self.output_padding
        return out

    def describe(self) -> str:
        """``Conv2d(2, 32, 3)``: the kind and its sizes, for messages."""
        if self.kind == "GroupNorm":
            return f"GroupNorm({self.groups}, {self.in_size})"
        if self.kind == "LayerNorm":
            dims = self.normalized
            return f"LayerNorm({dims[0] if len(dims) == 1 else list(dims)})"
        if self.kind == "MultiheadAttention":
            return f"MultiheadAttention({self.in_size}, {self.groups})"
        args = [str(self.in_size), str(self.out_size)]
        if self.kernel is not None:
            kh, kw = self.kernel
            args.append(str(kw) if kh == kw or self.kind == "Conv1d" else f"[{kh}, {kw}]")
        return f"{self.kind}({', '.join(args)})"

    def format(self) -> str:
        parts = [self.describe()[:-1]]
        if self.is_normalization:
            if self.eps != 1e-5:
                parts.append(f"eps={self.eps!r}")
            if not self.bias:
                parts.append("affine=false")
            return ", ".join(parts) + ")"
        defaults = {"stride": (1, 1), "padding": (0, 0), "output_padding": (0, 0)}
        for key in ("stride", "padding", "output_padding"):
            value = getattr(self, key)
            if value is not None and value != defaults[key]:
                parts.append(f"{key}={value[1] if self.kind == 'Conv1d' else _pair(value)}")
        if not self.bias and self.kind != "Embedding":
            parts.append("bias=false")
        if self.init_scale is not None:
            parts.append(f"init_scale={self.init_scale!r}")
        if self.norm is not None:
            parts.append(f"norm={self.norm}")
        return ", ".join(parts) + ")"


def _pair(p: tuple[int, int]) -> str:
    return str(p[0]) if p[0] == p[1] else f"[{p[0]}, {p[1]}]"


@dataclass(frozen=True)
class TensorInit:
    """How a raw ``tensor`` param starts: ``kind`` is zeros, ones, fill (``args=(value,)``),
    normal (``args=(mean, std)``) or uniform (``args=(lo, hi)``)."""

    kind: str
    args: tuple[float, ...] = ()

    def __str__(self) -> str:
        if self.kind == "fill":
            return format_attr(self.args[0])
        if not self.args:
            return self.kind
        return f"{self.kind}({', '.join(format_attr(a) for a in self.args)})"


@dataclass
class StateInfo:
    """A declared state: its node, declared shape, and its ``init`` and ``update`` sinks."""

    name: str
    node: str
    shape: tuple[Dim, ...]
    span: Span
    init: str | None = None
    update: str | None = None


@dataclass(frozen=True)
class Assumption:
    """A divisibility that the inferred shapes rely on: ``expr % divisor == 0`` (``expr`` a symbolic
    dimension such as ``H`` or a product ``H*W``); the generated code must check it at call time."""

    expr: str
    divisor: int
    span: Span

    def __str__(self) -> str:
        return f"{self.expr} % {self.divisor} == 0"


class LayerGraph:
    """One layer: the value graph ``g`` and the layer's metadata (all dicts in declaration order).

    * ``inputs``: name -> node; ``states``: name -> :class:`StateInfo`;
    * ``params``: qualified name (``fc.weight``, ``w``) -> node; ``modules``: name -> :class:`ModuleSpec`;
    * ``lets``, ``energies``: name -> node of its value, ``value_spans``: name -> where that value is
      written (a let or energy may be another named node: ``energy E = h``); ``output``: the output node;
    * ``solve``, ``backward``, ``eval_solve`` (the ``eval`` block: settings over ``solve`` in eval mode):
      validated settings, flat dicts (only the keys the spec gives), with ``solve_spans``/``backward_spans``/
      ``eval_spans`` (key -> span) for later errors;
    * ``assumptions``: :class:`Assumption` s the shapes rely on.
    """

    def __init__(self, name: str, span: Span):
        self.name = name
        self.span = span
        self.g = nx.MultiDiGraph()
        self.inputs: dict[str, str] = {}
        self.states: dict[str, StateInfo] = {}
        self.params: dict[str, str] = {}
        self.modules: dict[str, ModuleSpec] = {}
        self.lets: dict[str, str] = {}
        self.energies: dict[str, str] = {}
        self.value_spans: dict[str, Span] = {}
        self.output: str | None = None
        self.solve: dict[str, Any] = {}
        self.backward: dict[str, Any] = {}
        self.eval_solve: dict[str, Any] = {}
        self.solve_spans: dict[str, Span] = {}
        self.backward_spans: dict[str, Span] = {}
        self.eval_spans: dict[str, Span] = {}
        self.warnings: list = []  # FpiWarning s of the checking passes (legal, likely not meant)
        self.assumptions: list[Assumption] = []

    # ------------------------------------------------------------------ building and reading
    def add_node(self, op: str, *, span: Span, shape=None, name: str | None = None,
                 args: Sequence[str | tuple[str, Span]] = (), **attrs: Any) -> str:
        """Add a node after its arguments (node ids or ``(node id, use-site span)``); returns its id.

        Written into networkx's adjacency dicts directly, as ``MultiDiGraph.add_node``/``add_edge`` would (the
        edge key is the argument's position): their checks and cache clearing were a fifth of compiling."""
        g = self.g
        nid = f"n{len(g._node)}"
        if nid in g._node:
            raise GraphLintError(f"{nid} exists already: nodes were removed from this graph")
        g._node[nid] = {"op": op, "shape": shape, "span": span, "name": name, **attrs}
        succ = g._succ
        succ[nid] = {}
        preds = g._pred[nid] = {}
        for pos, arg in enumerate(args):
            src, use = arg if isinstance(arg, tuple) else (arg, span)
            keyed = preds.get(src)
            if keyed is None:
                users = succ[src]  # a KeyError: the argument is not a node of this graph
                keyed = preds[src] = users[nid] = {}
            keyed[pos] = {"pos": pos, "span": use}
        if getattr(g, "__networkx_cache__", None):  # graphs networkx converted for a backend, now stale
            g.__networkx_cache__.clear()
        return nid

    def node(self, nid: str) -> dict[str, Any]:
        """The attribute dict of a node (mutable: passes set ``shape``)."""
        return self.g._node[nid]

    def nodes(self) -> list[str]:
        """Node ids in insertion (= topological) order."""
        return list(self.g.nodes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.g.nodes)

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def _in_edges(self, nid: str) -> list[tuple[str, dict]]:
        # the adjacency dict directly: networkx's edge views cost ~10 us to make, per call; sorted by the edge keys,
        # the positions
        keyed_by_arg = self.g._pred[nid]
        if len(keyed_by_arg) == 1:
            ((u, keyed),) = keyed_by_arg.items()
            return [(u, keyed[k]) for k in sorted(keyed)]
        edges = sorted((k, u, i) for i, (u, keyed) in enumerate(keyed_by_arg.items()) for k in keyed)
        values = list(keyed_by_arg.values())
        return [(u, values[i][k]) for k, u, i in edges]

    def args(self, nid: str) -> list[str]:
        """The arguments of a node, by position (the edge keys)."""
        keyed_by_arg = self.g._pred[nid]
        if len(keyed_by_arg) == 1:  # one argument, or one value used several times
            ((u, keyed),) = keyed_by_arg.items()
            return [u] * len(keyed)
        if not keyed_by_arg:
            return []
        edges = sorted([(k, u) for u, keyed in keyed_by_arg.items() for k in keyed])
        return [u for _, u in edges]

    def arg_edges(self, nid: str) -> list[tuple[str, Span]]:
        """The arguments of a node, by position, each with where it is written."""
        return [(u, d["span"]) for u, d in self._in_edges(nid)]

    def arg_spans(self, nid: str) -> list[Span]:
        """Where each argument of a node is written."""
        return [d["span"] for _, d in self._in_edges(nid)]

    def users(self, nid: str) -> list[tuple[str, int]]:
        """(user, position) pairs of a node, in user order."""
        out = [(v, d["pos"]) for v, keyed in self.g._succ[nid].items() for d in keyed.values()]
        return sorted(out, key=lambda e: (int(e[0][1:]), e[1]))

    def shape(self, nid: str):
        return self.g._node[nid]["shape"]

    def downstream(self, sources: Iterable[str]) -> set[str]:
        """The nodes whose value depends on one of ``sources`` (the sources included): one walk, linear."""
        return _reach(sources, self.g.successors)

    def roots(self) -> list[str]:
        """The nodes the layer's code reads: every state's node, update and init, the inputs, the params and the
        output. A pass that compacts a graph keeps what these need."""
        out = [n for info in self.states.values() for n in (info.node, info.update, info.init) if n is not None]
        out += list(self.inputs.values()) + list(self.params.values())
        return out + ([self.output] if self.output is not None else [])

    def copy_extra_metadata(self, src: "LayerGraph", mapping: dict[str, str]) -> None:
        """Metadata a subclass adds, carried over from ``src`` through a node ``mapping`` when a graph is copied."""

    def upstream(self, roots: Iterable[str]) -> set[str]:
        """The nodes that one of ``roots`` depends on (the roots included): one walk, linear in the graph."""
        return _reach(roots, self.g.predecessors)

    def upstream_within(self, roots: Iterable[str], allowed: set[str]) -> set[str]:
        """The nodes of ``allowed`` that ``roots`` need through a path of ``allowed`` nodes (a root outside
        ``allowed`` is not entered)."""
        needed: set[str] = set()
        stack = list(roots)
        while stack:
            nid = stack.pop()
            if nid in needed or nid not in allowed:
                continue
            needed.add(nid)
            stack.extend(self.args(nid))
        return needed

    def label(self, nid: str) -> str:
        """How messages name a node: ``the state x``, ``the let h``, or ``this expression``."""
        data = self.g.nodes[nid]
        role = self.role(nid)
        if role is not None:
            return f"the {role} {data['name']}"
        return "this expression"

    def role(self, nid: str) -> str | None:
        data = self.g.nodes[nid]
        if data["op"] in ("input", "state", "param"):
            return data["op"]
        for kind, table in (("energy", self.energies), ("let", self.lets)):
            for name, node in table.items():
                if node == nid and name == data.get("name"):
                    return kind
        return None

    # ------------------------------------------------------------------ text form
    def format(self) -> str:
        """The deterministic text form: a header, then one node a line."""
        head = [f"layer {self.name}  # {self.span}"]
        if self.inputs:
            head.append("  inputs " + ", ".join(self.inputs))
        head.append("  states " + ", ".join(self.states))
        for name, spec in self.modules.items():
            head.append(f"  module {name} = {spec.format()}")
        for which, table in (("solve", self.solve), ("backward", self.backward), ("eval", self.eval_solve)):
            if table:
                head.append(f"  {which} " + ", ".join(f"{k}={format_attr(v)}" for k, v in table.items()))
        for a in self.assumptions:
            head.append(f"  assume {a}")
        labels = {}
        for kind, table in (("let", self.lets), ("energy", self.energies)):
            for name, node in table.items():
                labels.setdefault(node, f"{kind} {name}")
        body = [(f"  {nid} = {self._format_node(nid)}", labels.get(nid), self.node(nid)["span"])
                for nid in self.g.nodes]
        width = min(max((len(b[0]) for b in body), default=0), 72)
        lines = head + [
            f"{text.ljust(width)}  # " + (f"{label} @ {span}" if label else f"{span}")
            for text, label, span in body
        ]
        return "\n".join(lines) + "\n"

    def _format_node(self, nid: str) -> str:
        d = self.node(nid)
        op = d["op"]
        args = ", ".join(self.args(nid))
        if op in ("input", "state"):
            text = f"{op} {d['name']}"
        elif op == "param":
            text = f"param {d['name']}"
            if d.get("init") is not None:
                text += f" = {d['init']}"
        elif op == "const":
            text = f"const {format_attr(d['value'])}"
        elif op == "call":
            text = f"call {d['prim']}({args})"
            if d["attrs"]:
                text += " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in sorted(d["attrs"].items())) + "}"
        elif op == "update":
            text = f"update {d['state']}({args})"
        elif op == "init":
            text = f"init {d['state']}({args})" if d.get("fill") is None else \
                f"init {d['state']} = {format_attr(d['fill'])}"
        else:
            text = f"output({args})"
        if op != "output":
            text += f" : {self.dtype(nid) + ' ' if self.dtype(nid) != 'float' else ''}{fmt_shape(d['shape'])}"
        return text

    def dtype(self, nid: str) -> str:
        """``int`` or ``bool`` for an input declared so (an index: no gradient, only where an index is
        expected), ``float`` for every other value."""
        return self.g._node[nid].get("dtype") or "float"

    # ------------------------------------------------------------------ invariants
    def lint(self, shapes: bool = True) -> None:
        """Check the graph's invariants; raise :class:`GraphLintError` on the first broken one.

        ``shapes``: also require every node to have a shape (after shape inference). One pass over the nodes and
        edges; a message is formatted only when its check fails (formatting each one made lint a third of
        checking a large spec)."""
        order = {nid: i for i, nid in enumerate(self.g.nodes)}
        nodes, preds = self.g._node, self.g._pred
        in_order: list[tuple[str, dict]] = []  # the update, init and output nodes, for the checks after
        for nid, i in order.items():
            if nid != f"n{i}":
                _fail(f"node id {nid} at position {i}")
            d = nodes[nid]
            op = d.get("op")
            if op not in OPS:
                _fail(f"{nid}: op {op!r} is not in the closed op set")
            if not isinstance(d.get("span"), Span):
                _fail(f"{nid}: no span")
            if shapes and not isinstance(d.get("shape"), tuple):
                _fail(f"{nid}: no shape")
            n = 0
            for u, keyed in preds[nid].items():
                for k, data in keyed.items():
                    n += 1
                    if k != data["pos"]:
                        _fail(f"{nid}: edge key {k} != pos {data['pos']}")
                    if order[u] >= i:
                        _fail(f"{nid}: argument {u} comes after it (not topological)")
                    if not isinstance(data.get("span"), Span):
                        _fail(f"{nid}: argument {u} has no span")
            if n > 1 and sorted(k for keyed in preds[nid].values() for k in keyed) != list(range(n)) or \
                    n == 1 and not any(0 in keyed for keyed in preds[nid].values()):
                poss = sorted(data["pos"] for keyed in preds[nid].values() for data in keyed.values())
                _fail(f"{nid}: argument positions {poss} are not 0..n-1")
            if op == "call":
                _lint_call(nid, d, n)
            else:
                lo, hi = _ARITY[op]
                if not (lo <= n and (hi is None or n <= hi)):
                    _fail(f"{nid}: {op} with {n} arguments")
                if op == "init" and (d.get("fill") is None) != (n == 1):
                    _fail(f"{nid}: init needs a fill or one argument")
                if op in ("update", "init", "output"):
                    in_order.append((nid, d))
        # acyclic: every edge was checked above to run forward in the node order
        sinks: dict[tuple[str, str], list[str]] = {}
        for nid, d in in_order:
            if d["op"] in ("update", "init"):
                sinks.setdefault((d["op"], d["state"]), []).append(nid)
                _require(d["state"] in self.states, f"{nid}: {d['op']} of {d['state']!r}, not a state")
        for name, info in self.states.items():
            _require(self.g.nodes[info.node]["op"] == "state", f"state {name}: node {info.node} is not a state")
            for op, attr in (("update", info.update), ("init", info.init)):
                found = sinks.get((op, name), [])
                _require(found == [attr], f"state {name}: {op} nodes {found}, metadata says {attr}")
        for name, nid in self.inputs.items():
            _require(self.g.nodes[nid]["op"] == "input", f"input {name}: node {nid} is not an input")
        for name, nid in self.params.items():
            _require(self.g.nodes[nid]["op"] == "param", f"param {name}: node {nid} is not a param")
        outputs = [nid for nid, d in in_order if d["op"] == "output"]
        _require(outputs == ([self.output] if self.output else []), f"output nodes {outputs}")
        for name in self.modules:
            if self.modules[name].has_weight:
                _require(f"{name}.weight" in self.params, f"module {name} has no weight param")


def _reach(starts: Iterable[str], neighbours) -> set[str]:
    """Every node reachable from ``starts`` by ``neighbours`` (the starts included)."""
    out: set[str] = set()
    stack = list(starts)
    while stack:
        nid = stack.pop()
        if nid not in out:
            out.add(nid)
            stack.extend(neighbours(nid))
    return out


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise GraphLintError(message)


def _fail(message: str) -> None:
    raise GraphLintError(message)


def _lint_call(nid: str, d: dict[str, Any], n: int) -> None:
    """The invariants of a ``call`` node with ``n`` arguments: a known primitive, its arity and attributes."""
    prim = PRIMITIVES.get(d.get("prim"))
    if prim is None:
        _fail(f"{nid}: unknown primitive {d.get('prim')!r}")
    lo, hi, known, required = prim.call_rules
    if not (lo <= n and (hi is None or n <= hi)):
        _fail(f"{nid}: {prim.name} takes {lo}..{hi} arguments, has {n}")
    attrs = d.get("attrs")
    if not isinstance(attrs, dict):
        _fail(f"{nid}: attrs is not a dict")
    if not attrs and not known:
        return
    if not attrs.keys() <= known:
        _fail(f"{nid}: unknown attrs {sorted(set(attrs) - known)}")
    missing = [a for a in required if a not in attrs]
    if missing:
        _fail(f"{nid}: missing attrs {missing}")


class BackwardGraph(LayerGraph):
    """The backward fixed-point map of a layer: a :class:`LayerGraph` with, besides the primal nodes,

    * ``cotangents``: state name -> its cotangent node (op ``input``, ``role="cotangent"``,
      ``state=NAME``, named ``c_NAME``);
    * ``grad_of``: ``"state:x"`` / ``"input:a"`` / ``"param:fc1.weight"`` -> the node holding ∂h/∂that;
      no entry where the gradient is structurally zero;
    * an ``output`` node whose arguments are the ``grad_of`` nodes, in that order (the graph's sinks,
      with the states' ``update``/``init`` sinks kept from the primal graph).
    """

    def __init__(self, name, span):
        super().__init__(name, span)
        self.cotangents: dict[str, str] = {}
        self.grad_of: dict[str, str] = {}

    def roots(self) -> list[str]:
        return super().roots() + list(self.cotangents.values())

    def copy_extra_metadata(self, src: "LayerGraph", mapping: dict[str, str]) -> None:
        self.cotangents = {s: mapping[c] for s, c in src.cotangents.items()}
        self.grad_of = {k: mapping[v] for k, v in src.grad_of.items()}

    def result_keys(self) -> list[str]:
        """Every gradient the backward map can have, in state, input, param order."""
        return ([f"state:{s}" for s in self.states] + [f"input:{n}" for n in self.inputs]
                + [f"param:{n}" for n in self.params])

    def format(self) -> str:
        """The graph's text form, with the map ``h`` in the header and the gradients at the end."""
        head, body = super().format().split("\n", 1)
        h = " + ".join(f"{self.node(c)['name']} . g_{s}" for s, c in self.cotangents.items()) or "0"
        grads = [f"  grad {key} = {self.grad_of.get(key, '0')}" for key in self.result_keys()]
        return "\n".join([head, f"  backward h = {h}", body.rstrip("\n"), *grads]) + "\n"

    def lint(self, shapes: bool = True) -> None:
        super().lint(shapes)
        _require(list(self.cotangents) == list(self.states), "one cotangent per state, in state order")
        for state, nid in self.cotangents.items():
            d = self.node(nid)
            _require(d["op"] == "input" and d.get("role") == "cotangent" and d.get("state") == state,
                   f"{nid} is not the cotangent input of state {state}")
        keys = set(self.result_keys())
        for key, nid in self.grad_of.items():
            _require(key in keys, f"grad_of has an unknown key {key!r}")
            _require(nid in self.g, f"grad_of[{key!r}] = {nid} is not a node")
        _require(self.output is not None and self.args(self.output) == list(self.grad_of.values()),
               "the output node's arguments are not the grad_of nodes")
