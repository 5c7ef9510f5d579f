"""An fx graph of a map ``g(x, *args)`` written as a ``.fpi`` layer: one ``let`` per tensor operation.

The first tensor argument is the state ``x``, the other tensor arguments are inputs, the standard modules with
weights (``nn.Linear``, ``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.GroupNorm``, ``nn.LayerNorm``) are ``param``
modules and every other tensor the graph reads (an ``nn.Parameter``, a buffer, a captured tensor) is a raw
``param NAME : tensor [..]``. The batch dimension is the symbol ``B``; every other size is the example's.
:class:`WrittenSpec` says where each param's tensor lives in the traced module (``sources``), so the compiled
layer can share or copy it.

Python values computed from shapes (``x.shape[0]``, ``x.size(-1) // 2``) are taken from the two recorded runs
(:mod:`~fpidsl.tracing.fx_capture`): they never reach the spec as code, only as the sizes they stand for.
"""
from __future__ import annotations

import keyword
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, fx, nn

from ..ir.primitives import MODULE_KINDS
from ..passes.check_python_names import RESERVED as PYTHON_RESERVED
from ..passes.resolve import reserved
from . import table
from .extern_op import OpCall, Slot
from .fx_capture import BatchDim, UntraceableError, hooked, symbolic


@dataclass(frozen=True)
class Ref:
    """A tensor value of the spec: its name."""

    name: str


@dataclass
class WrittenSpec:
    """The ``.fpi`` text of a traced map and what the compiled layer needs besides it.

    ``sources``: spec param (``fc1.weight``, ``w``) -> the dotted name of its tensor in the traced module
    (``extern:NAME:module`` / ``extern:NAME:parameters`` for an extern's two params); ``inputs``: the names of the
    layer's inputs, one per tensor argument after the state; ``batched``: per input, whether its dimension 0 is the
    batch; ``externs``: each extern param's operation."""

    name: str
    text: str
    states: list[str]
    inputs: list[str]
    batched: list[bool]
    sources: dict[str, str] = field(default_factory=dict)
    externs: dict[str, OpCall] = field(default_factory=dict)


class Names:
    """Legal, unique spec names (not keywords, built-ins, module kinds, nor attributes of the compiled module)."""

    def __init__(self) -> None:
        self.used: set[str] = {"B"}

    def fresh(self, wanted: str, suffix: str = "v") -> str:
        """``wanted`` made legal; when taken, ``wanted_SUFFIX``, then ``wanted_SUFFIX2`` ..."""
        base = re.sub(r"\W", "_", wanted).strip("_") or suffix
        if base[0].isdigit():
            base = f"{suffix}{base}"
        name, i = base, 1
        while self._taken(name):
            name, i = f"{base}_{suffix}{'' if i == 1 else i}", i + 1
        self.used.add(name)
        return name

    def _taken(self, name: str) -> bool:
        return (name in self.used or reserved(name) is not None or keyword.iskeyword(name)
                or name in PYTHON_RESERVED or name in MODULE_KINDS or name in ("None", "true", "false"))


def _at(value: Any, batch: int) -> Any:
    """A symbolic value (see :func:`~fpidsl.tracing.fx_capture.symbolic`) at the batch size ``batch``."""
    if isinstance(value, BatchDim):
        return value.scale * batch + value.offset
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(_at(v, batch) for v in value)
    return value


def _same_size(predicted: Any, recorded: Any) -> bool:
    """A symbolic value's prediction is what the map computed at that batch size (NaN equal to NaN)."""
    if isinstance(recorded, (tuple, list, torch.Size)):
        return isinstance(predicted, tuple) and len(predicted) == len(recorded) and \
            all(_same_size(p, r) for p, r in zip(predicted, recorded))
    if isinstance(recorded, float) and recorded != recorded:
        return isinstance(predicted, float) and predicted != predicted
    try:
        return bool(predicted == recorded)
    except Exception:  # noqa: BLE001 - a value without a plain equality: not a size
        return True


def _is_batch(dim: Any) -> bool:
    return isinstance(dim, BatchDim) and dim.is_batch


@dataclass(frozen=True)
class SparseRef(Ref):
    """A sparse tensor argument declared ``input NAME : sparse [N, M]`` (``transposed``: its transpose, ``A.t()``):
    only ``spmm`` reads it."""

    transposed: bool = False


SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr)
# the dtypes of the arguments declared ``input NAME : int [...]`` / ``bool [...]`` (indices and masks)
INDEX_DTYPES = {torch.int64: "int", torch.bool: "bool"}
# A @ x with A sparse: torch.sparse.mm(A, x), torch.mm(A, x), torch.matmul(A, x), A @ x, A.mm(x), A.matmul(x)
_SPMM_FUNCTIONS = (torch.sparse.mm, torch.mm, torch.matmul, operator.matmul)
_SPMM_METHODS = frozenset({"mm", "matmul", "__matmul__"})


def _spmm_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(A, x)`` when ``node`` is a matrix product of two graph values written with two positional arguments."""
    products = (node.op == "call_function" and any(node.target is f for f in _SPMM_FUNCTIONS)) or \
        (node.op == "call_method" and node.target in _SPMM_METHODS)
    if not products or node.kwargs or len(node.args) != 2 or \
            not all(isinstance(a, fx.Node) for a in node.args):
        return None
    return node.args[0], node.args[1]


def _reads_shape(node: fx.Node) -> bool:
    """``node`` reads only its first argument's shape: ``x.size()``, ``x.dim()``, ``x.shape``, ``x.dtype`` ..."""
    return (node.op == "call_method" and node.target in table.SHAPE_METHODS) or \
        (node.op == "call_function" and node.target is getattr and len(node.args) == 2
         and node.args[1] in table.SHAPE_ATTRIBUTES)


def _dotted(obj: Any, path: str) -> Any:
    """``obj.a.b`` for the path ``"a.b"``, None where an attribute is missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _transposes(node: fx.Node, sparse: fx.Node) -> bool:
    """``node`` is the transpose of the 2-D ``sparse``: ``A.t()``, ``torch.t(A)``, ``A.T``, ``A.mT``,
    ``A.transpose(0, 1)``, ``torch.transpose(A, 1, 0)`` (dims -2, -1 too)."""
    if node.kwargs or not node.args or node.args[0] is not sparse:
        return False
    rest = node.args[1:]
    if node.op == "call_function" and node.target is getattr:
        return rest in (("T",), ("mT",))
    named = (node.op == "call_method" and node.target in ("t", "transpose", "swapaxes")) or \
        (node.op == "call_function" and any(node.target is f for f in (torch.t, torch.transpose, torch.swapaxes)))
    if not named:
        return False
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name == "t":
        return rest == ()
    return len(rest) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and -2 <= d <= 1 for d in rest) \
        and {d % 2 for d in rest} == {0, 1}


class Writer:
    """Walks the graph once and collects the declarations (see the module's doc)."""

    def __init__(self, module: fx.GraphModule, first: dict, second: dict, batch: int, batched: Sequence[bool],
                 layer_name: str, externs: bool = True, n_states: int = 1, labels: dict[str, str] | None = None,
                 origin: str | None = None, third: dict | None = None):
        self.allow_externs, self.n_states = externs, n_states
        self.origin = origin  # where the map is defined ("file:line"): the position of a refused argument
        self.labels = labels or {}  # a foreign target's name in the user's code (a closure's variable)
        self.module, self.first, self.second, self.batch = module, first, second, batch
        self.third = third  # the values at batch 2 * batch + 1 (None: not recorded), to check the sizes' B-rule
        self.batched_args = list(batched)
        self.names = Names()
        self.layer = self.names.fresh(layer_name)
        self.env: dict[fx.Node, Any] = {}
        self.inputs: list[str] = []
        self.input_decls: list[str] = []
        self.states: list[str] = []
        self.state_decls: list[str] = []
        self.params: list[str] = []
        self.lets: list[str] = []
        self.sources: dict[str, str] = {}
        self.declared_modules: dict[str, str] = {}
        self.externs: dict[str, OpCall] = {}
        self.extern_notes: list[str] = []
        self.updates: list[str] = []
        self.node: fx.Node | None = None
        self.current = ""
        self.sparse_transposes: set[fx.Node] = set()  # A.t() of a sparse argument, read only by spmm
        self.index_nodes: set[fx.Node] = set()  # int64 / bool arguments and the int / bool values made from them
        # values the layer holds in another dtype than the map does: a comparison's bool (a 0/1 mask in the layer),
        # what the map computes from it in an integer dtype (mask.sum(1)), a cast of one (mask.float())
        self.recast: set[fx.Node] = set()
        self.extern_nodes: set[fx.Node] = set()
        self.sparse_args = self._sparse_arguments()

    def _sparse_arguments(self) -> set[fx.Node]:
        """The sparse tensor arguments written ``input A : sparse [N, M]``: 2-D COO or CSR, in the state's dtype,
        not requiring grad, and every use a product ``A @ x`` with a dense 2-D ``x`` (``spmm``), a transpose
        ``A.t()`` whose every use is such a product (``spmm(A, x, transpose=true)``) or a read of its shape. A sparse
        argument used any other way stays a dense input, and its uses externs (as before spmm was mapped)."""
        placeholders = [n for n in self.module.graph.nodes if n.op == "placeholder"]
        state = self.first.get(placeholders[0]) if placeholders else None
        out = set()
        for node in placeholders:
            value = self.first.get(node)
            if not (isinstance(value, Tensor) and value.layout in SPARSE_LAYOUTS and value.dim() == 2
                    and not value.requires_grad and isinstance(state, Tensor) and value.dtype == state.dtype):
                continue
            transposes = {user for user in node.users if _transposes(user, node)
                          and all(self._spmm_of(u, user) for u in user.users)}
            if all(self._spmm_of(user, node) or (_reads_shape(user) and user.args[0] is node) or user in transposes
                   for user in node.users):
                out.add(node)
                self.sparse_transposes |= transposes
        return out

    def _spmm_of(self, node: fx.Node, sparse: fx.Node) -> bool:
        """``node`` is ``sparse @ x`` with ``x`` a dense 2-D value of matching size and the result dense."""
        operands = _spmm_operands(node)
        if operands is None or operands[0] is not sparse or operands[1] is sparse:
            return False
        x, out = self.first.get(operands[1]), self.first.get(node)
        a = self.first[sparse]
        return (isinstance(x, Tensor) and x.layout == torch.strided and x.dim() == 2 and x.dtype == a.dtype
                and x.shape[0] == a.shape[1] and isinstance(out, Tensor) and out.layout == torch.strided
                and tuple(out.shape) == (a.shape[0], x.shape[1]))


    # ------------------------------------------------------------------ values as text
    def is_tensor(self, value: Any) -> bool:
        return isinstance(value, Ref)

    def text(self, value: Any) -> str:
        """A tensor's name, or a number's literal (parenthesised when negative)."""
        if isinstance(value, Ref):
            return value.name
        literal = self.number(value)
        return f"({literal})" if literal.startswith("-") else literal

    def number(self, value: Any) -> str:
        if isinstance(value, BatchDim):
            raise UntraceableError("a size that follows the batch is used as a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UntraceableError(f"{type(value).__name__} {value!r} where a number or a tensor is expected")
        if isinstance(value, float) and not math.isfinite(value):
            raise UntraceableError(f"the number {value!r} (the language has finite numbers only)")
        return repr(value) if isinstance(value, float) else str(value)

    def attr(self, value: Any) -> str:
        """A static argument: an integer, a number, a boolean or a list of them."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (list, tuple, torch.Size)):
            return "[" + ", ".join(self.attr(v) for v in value) + "]"
        return self.number(value)

    def index_item(self, item: Any) -> str:
        if item is None:
            return "None"
        if item is Ellipsis:
            return "..."
        if isinstance(item, slice):
            parts = [item.start, item.stop] + ([item.step] if item.step is not None else [])
            if any(isinstance(p, BatchDim) for p in parts):
                raise UntraceableError("a slice bounded by a size that follows the batch")
            return ":".join("" if p is None else self.number(p) for p in parts)
        if isinstance(item, int) and not isinstance(item, bool):
            return self.number(item)
        raise UntraceableError(f"indexing with {type(item).__name__} (integers, slices, None and ... only)")

    def shape(self, value: Any) -> tuple:
        node = next(n for n, v in self.env.items() if v == value)
        return self._shape(node)

    def _shape(self, node: fx.Node) -> tuple:
        return symbolic(self.first[node], self.second[node], self.batch)

    def target_shape(self) -> str:
        """The current node's shape as a reshape target: ``B`` for the batch, ``-1`` for one other size that
        follows it."""
        dims = self._shape(self.node)
        moving = [d for d in dims if isinstance(d, BatchDim) and not d.is_batch]
        if len(moving) > 1:
            raise UntraceableError("a reshape with two sizes that follow the batch")
        return "[" + ", ".join("B" if _is_batch(d) else "-1" if isinstance(d, BatchDim) else str(d)
                               for d in dims) + "]"

    def node_shape(self) -> tuple:
        """The current node's shape, with the sizes that follow the batch as :class:`BatchDim`."""
        return self._shape(self.node)

    def constructed_in_state_dtype(self) -> None:
        """A constructor (``torch.eye``, ``torch.zeros`` ...) is made in the layer's dtype and device (its first
        state's, in the compiled layer): refused when the map made it in another."""
        made, like = self.first[self.node], self._state_example()
        if made.dtype != like.dtype or made.device != like.device:
            raise UntraceableError(f"{self.current} made in {made.dtype} on {made.device}, the state is {like.dtype} "
                                   f"on {like.device} (pass dtype=x.dtype, device=x.device)")

    def _state_example(self) -> Tensor:
        """The first state's example value: the layer's dtype and device."""
        return self.first[next(n for n in self.module.graph.nodes if n.op == "placeholder")]

    def same_dtype(self, value: Any) -> bool:
        node = self._node_of(value)
        before, after = self.first[node].dtype, self.first[self.node].dtype
        return before == after or (after.is_floating_point and node not in self.index_nodes
                                   and (before == torch.bool or node in self.recast))

    def _node_of(self, value: Any) -> fx.Node:
        """The node whose value ``value`` is: among the current node's inputs first (``m.float()`` and ``m`` are
        one name in the spec, and two dtypes in the map)."""
        for n in (*self.node.all_input_nodes, *self.env):
            if self.env.get(n) == value:
                return n
        raise KeyError(value)

    def is_bool(self, value: Any) -> bool:
        """``value`` is a bool tensor in the map (a comparison, which the layer holds as a 0/1 mask)."""
        if not isinstance(value, Ref):
            return False
        made = self.first.get(self._node_of(value))
        return isinstance(made, Tensor) and made.dtype == torch.bool

    def gives_bool(self) -> bool:
        """The current node is a bool tensor in the map."""
        made = self.first.get(self.node)
        return isinstance(made, Tensor) and made.dtype == torch.bool

    def no_dtype(self, bound: dict) -> None:
        if bound.get("dtype") is not None:
            raise UntraceableError(f"{self.current} with a dtype")

    # ------------------------------------------------------------------ declarations
    def declared_shape(self, node: fx.Node, batched: bool) -> str:
        dims = list(self.first[node].shape)
        return "[" + ", ".join("B" if batched and i == 0 else str(d) for i, d in enumerate(dims)) + "]"

    def module_decl(self, type_text: str, roles: Sequence[str] = ("weight", "bias"), target: str | None = None) -> str:
        """Declare a module (the current node's unless ``target``) as a param, once per module; its spec name.
        ``roles``: the module's tensors the param reads (dotted paths), those that are not None."""
        target = self.node.target if target is None else target
        if target not in self.declared_modules:
            name = self.names.fresh(self._label(target))
            self.params.append(f"param {name} : {type_text}")
            module = self.module.get_submodule(target)
            for role in roles:
                if _dotted(module, role) is not None:
                    self.sources[f"{name}.{role}"] = f"{target}.{role}"
            self.declared_modules[target] = name
        return self.declared_modules[target]

    # ------------------------------------------------------------------ the walk
    def write(self) -> WrittenSpec:
        for node in self.module.graph.nodes:
            self.node = node
            try:
                self.env[node] = self._visit(node)
                value = self.first.get(node)
                if node.op != "placeholder" and isinstance(value, Tensor) and not value.is_floating_point() and \
                        any(a in self.index_nodes for a in node.all_input_nodes):
                    self.index_nodes.add(node)  # tokens[:, 0], mask.unsqueeze(-1): still an index
                elif self._held_otherwise(node, value):
                    self.recast.add(node)
            except UntraceableError as exc:
                where = self.origin if node.op == "placeholder" and self.origin else _where(node)
                raise UntraceableError(f"{exc} (at {where})") from None
        if len(self.states) != self.n_states:
            raise UntraceableError("the map has no tensor argument to iterate")
        head = [f"layer {self.layer} {{", *(f"  {d}" for d in (*self.input_decls, *self.state_decls, *self.params,
                                                                   *self.lets)),
                *(f"  update {s} = {u}" for s, u in zip(self.states, self.updates)), "}"]
        notes = "".join(f"# {note}\n" for note in self.extern_notes)
        text = "# Traced from a PyTorch map by fpidsl.trace; B is the batch.\n" + notes + "\n".join(head) + "\n"
        return WrittenSpec(self.layer, text, self.states, self.inputs,
                           list(self.batched_args[self.n_states:self.n_states + len(self.inputs)]), self.sources,
                           self.externs)

    def _held_otherwise(self, node: fx.Node, value: Any) -> bool:
        """Whether the layer holds the tensor ``node`` (written by the spec) in another dtype than the map: a bool
        or integer tensor computed inside the map (``x > 0``, ``mask.sum(1)``), a 0/1 or integer-valued float in
        the layer; a cast of one to another float dtype (``mask.float()`` of a float64 state)."""
        if node.op not in ("call_function", "call_method", "call_module") or not isinstance(value, Tensor) or \
                node in self.extern_nodes or not isinstance(self.env.get(node), Ref) or \
                isinstance(self.env.get(node), SparseRef):
            return node in self.recast
        if not value.is_floating_point():
            return True
        return value.dtype != self._state_example().dtype and any(a in self.recast for a in node.all_input_nodes)

    def _visit(self, node: fx.Node) -> Any:
        value = self.first.get(node)
        if node.op == "placeholder":
            return self._placeholder(node, value)
        if node.op == "get_attr":
            return self._attribute(node, value)
        if node.op == "output":
            result = self._arg(node.args[0])
            results = [result] if self.n_states == 1 and isinstance(result, Ref) else result
            if not isinstance(results, (list, tuple)) or len(results) != self.n_states or \
                    not all(isinstance(r, Ref) for r in results):
                raise UntraceableError(f"the map must return the new state{'s' if self.n_states > 1 else ''} "
                                       f"({self.n_states} tensor{'s' if self.n_states > 1 else ''})")
            self.updates = [r.name for r in results]
            return None
        if _is_tuple_of_tensors(value) and node.op in ("call_function", "call_method", "call_module"):
            return self._tuple_call(node, value)
        if _element_of(node) is not None and isinstance(self.env.get(node.args[0]), TupleValue):
            return self._tuple_element(node)
        if not isinstance(value, Tensor):
            return self._python_value(node)
        if node.op == "call_module":
            return self._module_call(node)
        return self._call(node)

    def _placeholder(self, node: fx.Node, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        position = len(self.inputs) + len(self.states)
        if not value.is_floating_point():
            kind = INDEX_DTYPES.get(value.dtype)
            if kind is None or len(self.states) < self.n_states or value.layout != torch.strided:
                raise UntraceableError(f"the argument {node.target} is a {value.dtype} tensor (floating point, "
                                       "int64 or bool only)")
            # indices (token ids) or a mask: read only as an index (Embedding, gather, index_select, where's
            # condition); the spec check refuses any other use, and an extern on one is refused (see _extern)
            name = self.names.fresh(node.target)
            self.inputs.append(name)
            self.input_decls.append(f"input {name} : {kind} {self.declared_shape(node, self.batched_args[position])}")
            self.index_nodes.add(node)
            return Ref(name)
        name = self.names.fresh(node.target)
        if node in self.sparse_args and len(self.states) == self.n_states:
            self.batched_args[position] = False  # data the layer reads whole (spmm mixes rows), never sliced
            dims = ", ".join("B" if _is_batch(d) else str(d) for d in self._shape(node))
            self.inputs.append(name)
            self.input_decls.append(f"input {name} : sparse [{dims}]")
            return SparseRef(name)
        batched = self.batched_args[position]  # a state's batch is B unless it is fixed (see trace_map)
        if len(self.states) < self.n_states:
            self.states.append(name)
            self.state_decls.append(f"state {name} : {self.declared_shape(node, batched)}")
        else:
            self.inputs.append(name)
            self.input_decls.append(f"input {name} : {self.declared_shape(node, batched)}")
        return Ref(name)

    def _attribute(self, node: fx.Node, value: Any) -> Any:
        if isinstance(value, torch.ScriptObject):
            self._script_module(node, value)
        if not isinstance(value, Tensor):
            return value
        if not value.is_floating_point():
            raise UntraceableError(f"the tensor {node.target} is {value.dtype} (floating point only)")
        name = self.names.fresh(self._label(node.target))
        self.params.append(f"param {name} : tensor {self.declared_shape(node, False)}")
        self.sources[name] = node.target
        return Ref(name)

    def _script_module(self, node: fx.Node, value: torch.ScriptObject) -> None:
        """A TorchScript module (``torch.jit.script`` / ``torch.jit.trace`` of a module) with parameters is refused:
        fx does not keep it a leaf but reads its C++ module (``j._c``) and calls that's compiled ``forward`` as one
        opaque operation, an extern whose only arguments are the tensors it is called on, so its parameters would
        get no gradient (its own ``parameters()`` are not reachable as the extern's: ``torch.func.functional_call``,
        which an extern module's parameters go through, refuses jitted modules). Without parameters it stays an
        extern (differentiated by autograd in its inputs)."""
        if not isinstance(value, torch._C.ScriptModule):
            return
        try:
            wrapped = torch.jit._recursive.wrap_cpp_module(value)
            held, kind = next(iter(wrapped.parameters()), None) is not None, getattr(wrapped, "original_name", "")
        except Exception:  # a module whose parameters cannot be listed: as if it had some
            held, kind = True, ""
        if held:
            target = str(node.target).removesuffix("._c")
            shown = self._label(target) if not target.startswith("_torchbind_obj") else "a submodule"
            raise UntraceableError(f"the map calls the TorchScript module {shown}{f' ({kind})' if kind else ''} "
                                   "(torch.jit.script / torch.jit.trace), which torch.fx runs as one opaque call: a "
                                   "trace would give its parameters no gradient; call the module itself (not "
                                   "scripted) to trace it, or let fixed_point use autograd (trace=False)")

    def _python_value(self, node: fx.Node) -> Any:
        """A value computed from shapes only; anything else that is not a tensor is refused."""
        args = [self._arg(a) for a in node.args]
        if any(isinstance(a, Ref) for a in args):
            if not _reads_shape(node):
                raise UntraceableError(f"{_what(node)} gives a Python value computed from a tensor's contents")
        elif node.op == "call_function" and node.target not in table.PYTHON_FUNCTIONS:
            raise UntraceableError(f"{_what(node)} gives a Python value")
        operands = [*args, *(self._arg(v) for v in node.kwargs.values())]
        follows = [a for a in operands if isinstance(a, BatchDim)]
        if follows and node.op == "call_function" and (
                node.target is operator.floordiv or (node.target is operator.mul and len(follows) > 1)):
            what = ("with //", "x.shape[0] // 2") if node.target is operator.floordiv else \
                ("as a product of two", "x.shape[0] * x.shape[0]")
            raise UntraceableError(f"an integer computed from the batch size {what[0]} ({what[1]}, say; "
                                   f"{self.first[node]!r} at batch {self.batch}) is no size a * B + b, which is all "
                                   "a layer's sizes follow: the layer would keep it at the example's value at every "
                                   "batch size; pass it as an argument, or solve with trace=False")
        value = symbolic(self.first[node], self.second[node], self.batch)
        if self.third is not None and node in self.third:
            m = 2 * self.batch + 1
            if not _same_size(_at(value, m), self.third[node]):
                raise UntraceableError(
                    f"a value computed from the batch size ({self.first[node]!r} at batch {self.batch}, "
                    f"{self.second[node]!r} at {self.batch + 1}, {self.third[node]!r} at {m}) is no size a * B + b, "
                    "and the layer would get it wrong at other batch sizes; pass it as an argument, or solve with "
                    "trace=False")
        return value

    # ------------------------------------------------------------------ operations that return a tuple
    def _tuple_call(self, node: fx.Node, value: Sequence) -> TupleValue:
        """An operation returning a tuple (``torch.split``, ``nn.MultiheadAttention``): each element the map takes
        (``t[0]``, ``a, b = t``) is written where it is taken; the tuple used in any other way is refused."""
        for user in node.users:
            if _element_of(user) is None or user.args[0] is not node:
                raise UntraceableError(f"{_what(node)} returns a tuple of {len(value)}, and the map uses the tuple "
                                       f"whole ({_what(user)}); only its elements taken with constant indices "
                                       "(t[0], a, b = t) are traced")
        return TupleValue(node, len(value))

    def _tuple_element(self, node: fx.Node) -> Ref | None:
        """Element ``i`` of a tuple operation: an index of its input (split, chunk, unbind), the attention module
        (element 0 of ``nn.MultiheadAttention``), else an extern that gives the element."""
        if not node.users:  # ``out, _ = attn(x, x, x)``: an element the map drops is not written
            return None
        whole: TupleValue = self.env[node.args[0]]
        i = _element_of(node) % whole.size
        call = whole.node
        element = self.first[node]
        if not isinstance(element, Tensor) or not element.is_floating_point():
            what = f"a {element.dtype} tensor" if isinstance(element, Tensor) else "no tensor"
            raise UntraceableError(f"element {i} of {_what(call)} is {what} (floating-point tensors only)")
        try:
            text = self._split_element(call, i) if _splits(call) else \
                self._attention_element(call, i) if call.op == "call_module" else None
            if text is None:
                raise UntraceableError(f"{_what(call)} has no primitive")
            return self._let(text, suffix="out")
        except UntraceableError:
            if not self.allow_externs:
                raise
            kind = {"call_module": "module", "call_method": "method"}.get(call.op, "function")
            return self._extern(OpCall(kind, call.target, (), {}, item=i), call)

    def _split_element(self, call: fx.Node, i: int) -> str:
        """``v[:, a:b]`` (split, chunk) or ``v[:, i]`` (unbind) along a dimension of fixed size."""
        name = call.target if call.op == "call_method" else call.target.__name__
        source = call.args[0] if call.args else call.kwargs.get("input", call.kwargs.get("tensor"))
        if not isinstance(source, fx.Node) or not isinstance(self.env.get(source), Ref):
            raise UntraceableError(f"{_what(call)} of other than a tensor")
        position = 1 if name == "unbind" else 2
        dim = call.args[position] if len(call.args) > position else call.kwargs.get("dim", 0)
        shape = self._shape(source)
        if not isinstance(dim, int) or isinstance(dim, bool) or not -len(shape) <= dim < len(shape):
            raise UntraceableError(f"{_what(call)} with dim {dim!r}")
        dim %= len(shape)
        if isinstance(shape[dim], BatchDim):
            raise UntraceableError(f"{_what(call)} along the batch")
        sizes = [t.shape[dim] if name != "unbind" else 1 for t in self.first[call]]
        if name != "unbind" and sizes != [t.shape[dim] for t in self.second[call]]:
            raise UntraceableError(f"{_what(call)} into pieces that follow the batch")
        start = sum(sizes[:i])
        item = str(i) if name == "unbind" else f"{start}:{start + sizes[i]}"
        return f"{self.env[source].name}[{', '.join([':'] * dim + [item])}]"

    def _attention_element(self, call: fx.Node, i: int) -> str | None:
        """``attn(q, k, v)``: element 0 of a batch-first ``nn.MultiheadAttention``, ``mask=`` its float attn_mask (its weights,
        element 1, are no primitive: an extern when the map takes them)."""
        m = self.module.get_submodule(call.target)
        if type(m) is not nn.MultiheadAttention or i != 0:
            return None
        names = ("query", "key", "value")
        args = [self._arg(a) for a in call.args] + [self._arg(call.kwargs[k]) for k in names[len(call.args):]
                                                     if k in call.kwargs]
        extra = {k: v for k, v in call.kwargs.items() if k not in names}
        mask = extra.pop("attn_mask", None)  # a float mask is added to the scores, as the module's mask= is
        plain = {"key_padding_mask": None, "is_causal": False}
        if len(args) != 3 or not all(isinstance(a, Ref) and len(self.shape(a)) == 3 for a in args) or \
                any(k not in (*plain, "need_weights", "average_attn_weights") for k in extra) or \
                any(extra.get(k, v) != v for k, v in plain.items()) or \
                (mask is not None and not (isinstance(mask, fx.Node) and isinstance(self.env.get(mask), Ref)
                                           and self.first[mask].is_floating_point())):
            raise UntraceableError(f"{_what(call)} called other than on three 3-D tensors, with no mask but a "
                                   "float attn_mask")
        biased = m.in_proj_bias is not None
        if not m.batch_first or not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn or \
                (m.training and m.dropout != 0) or biased != (m.out_proj.bias is not None):
            raise UntraceableError(f"{_what(call)}: only batch-first attention with kdim = vdim = embed_dim, "
                                   "no bias_k / bias_v / add_zero_attn / dropout is a primitive")
        name = self.module_decl(f"MultiheadAttention({m.embed_dim}, {m.num_heads}{'' if biased else ', bias=false'})",
                                roles=("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"),
                                target=call.target)
        masked = "" if mask is None else f", mask={self.env[mask].name}"
        return f"{name}({', '.join(a.name for a in args)}{masked})"

    def _arg(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, slice):  # x[:, : y.shape[-1]]: a size inside a slice
            return slice(self._arg(a.start), self._arg(a.stop), self._arg(a.step))
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(v) for v in a) if not isinstance(a, torch.Size) else tuple(a)
        if isinstance(a, dict):
            return {k: self._arg(v) for k, v in a.items()}
        return a

    def _module_call(self, node: fx.Node) -> Ref:
        module = self.module.get_submodule(node.target)
        if nn.utils.parametrize.is_parametrized(module):
            raise UntraceableError(f"{type(module).__name__} {node.target} is parametrized (spectral norm ...)")
        args = [self._arg(a) for a in node.args]
        kind = type(module)
        try:
            if hooked(module):  # old-style weight_norm computes the weight in a pre-hook: the module's own call
                raise UntraceableError(f"the module {node.target} ({kind.__name__}) has forward hooks")
            if kind in table.WEIGHTED_MODULES:
                if len(args) != 1 or node.kwargs or not isinstance(args[0], Ref):
                    raise UntraceableError(f"{kind.__name__} called on other than one tensor")
                name = table.WEIGHTED_MODULES[kind](self, module)
                return self._let(f"{name}({args[0].name})", suffix="out")
            if kind in table.ACTIVATION_MODULES:
                canonical, options = table.ACTIVATION_MODULES[kind](module)
                self._promotes_mask(node, canonical)
                if getattr(module, "inplace", False):  # nn.ReLU(inplace=True): later reads of its input see it
                    return self._in_place(node, self._apply(canonical, args, options))
                return self._apply(canonical, args, options)
            raise UntraceableError(f"the module {node.target} ({kind.__name__}) has no primitive")
        except UntraceableError:
            if not self.allow_externs or getattr(module, "inplace", False):  # an extern would not write its input
                raise
            return self._extern(OpCall("module", node.target, (), {}), node)

    def _in_place(self, node: fx.Node, result: Ref) -> Ref:
        """``result`` of an operation that overwrites its input: the input's later readers read ``result``. Only
        where nothing else holds the input's memory (a view, an argument, a parameter would change with it)."""
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op not in ("call_function", "call_method", "call_module"):
            raise UntraceableError(f"{_what(node)} overwrites an argument or a parameter of the map in place")
        def memory(value: Any) -> int | None:
            return value.untyped_storage().data_ptr() if isinstance(value, Tensor) and \
                value.layout == torch.strided else None

        held = memory(self.first[source])
        for other in self.module.graph.nodes:
            if other is node:
                break
            if other is not source and memory(self.first.get(other)) == held:
                raise UntraceableError(f"{_what(node)} works in place on a tensor that shares its memory with "
                                       f"another value of the map ({other.name}: a view of it, or it of that)")
        self.env[source] = result
        return result

    def _call(self, node: fx.Node) -> Ref:
        operands = _spmm_operands(node)
        if operands is not None and isinstance(self.env.get(operands[0]), SparseRef):
            a = self.env[operands[0]]
            return self._let(f"spmm({a.name}, {self.env[operands[1]].name}{', transpose=true' * a.transposed})")
        if node in self.sparse_transposes:
            return SparseRef(self.env[node.args[0]].name, transposed=True)
        args = [self._arg(a) for a in node.args]
        kwargs = {k: self._arg(v) for k, v in node.kwargs.items()}
        if node.op == "call_method":
            canonical = table.METHODS.get(node.target)
        elif node.target is getattr and len(args) == 2 and args[1] in ("T", "mT"):
            canonical, args = args[1], args[:1]
        else:
            canonical = table.FUNCTIONS.get(node.target)
        casts = canonical in ("to", "type", "float", "double") or (node.op, node.target) == ("call_method", "type_as")
        if casts and self._mask_as_numbers(node):
            return self._let(f"where({args[0].name}, 1, 0)")  # keep.float(): 1 where True, 0 elsewhere
        if canonical not in table.INDEX_OPS and any(a in self.index_nodes for a in node.all_input_nodes):
            raise UntraceableError(f"{_what(node)} reads an int or bool argument, which the layer reads only as an "
                                   "index (Embedding, gather, index_select, where's condition, their shape ops)")
        try:
            if canonical is None or canonical not in table.OPS:
                raise UntraceableError(f"{_what(node)} has no primitive")
            self._promotes_mask(node, canonical)
            return self._apply(canonical, args, kwargs)
        except UntraceableError as exc:
            in_place = node.kwargs.get("inplace") or (node.op == "call_method" and node.target.endswith("_")
                                                      and not node.target.startswith("_"))
            if not self.allow_externs or in_place or node.target is getattr:
                raise UntraceableError(f"{exc}" if in_place or not self.allow_externs else
                                       f"{_what(node)} has no primitive") from None
            kind = "method" if node.op == "call_method" else "function"
            return self._extern(OpCall(kind, node.target, (), {}), node)

    def _promotes_mask(self, node: fx.Node, canonical: str) -> None:
        """Refuse (an extern then runs it on the map's dtypes) an operation on a mask, or on a value computed from
        one in an integer dtype, that torch computes in another float dtype than the layer: ``mask * 0.1``,
        ``torch.tanh(mask)``, ``mask.sum(1) / 6`` are float32 (torch's default dtype) in the map where the layer's
        mask is the state's float64. (``where``'s condition and ``masked_fill``'s mask do not take part in the
        result's dtype, but ``where(x > 0, 1.0, 0.2)`` with two numbers is torch's default dtype too; a cast,
        ``mask.float()``, keeps the 0/1 values in any float dtype.)"""
        made = self.first.get(node)
        like = self._state_example().dtype
        if not isinstance(made, Tensor) or not made.is_floating_point() or made.dtype == like or \
                canonical in ("to", "type", "float", "double", "contiguous", "clone"):
            return
        conditions = {"where": (0, "condition"), "masked_fill": (1, "mask")}.get(canonical)
        skipped = set()
        if conditions is not None:
            position, keyword = conditions
            skipped.add(node.args[position] if len(node.args) > position else node.kwargs.get(keyword))
        values = [a for a in node.all_input_nodes if a not in skipped]
        if any(a in self.recast for a in values) or \
                (not values and any(a in self.recast for a in node.all_input_nodes)):  # where(x > 0, 1.0, 0.2)
            raise UntraceableError(f"{_what(node)} of a bool (or integer) tensor computed in the map gives "
                                   f"{str(made.dtype).removeprefix('torch.')} in torch, where the layer holds the "
                                   f"tensor as {str(like).removeprefix('torch.')}")

    def _extern(self, call: OpCall, node: fx.Node) -> Ref:
        """An operation with no primitive as an extern param: declared with its arguments' and result's shapes,
        called on its tensor arguments (the others are fixed into the :class:`OpCall`)."""
        refs: list[Ref] = []

        def template(a: Any) -> Any:
            if isinstance(a, fx.Node):
                if a in self.index_nodes:
                    raise UntraceableError(f"{_what(node)} has no primitive, and it reads an int or bool argument "
                                           "(read only as an index: Embedding, gather, index_select, where)")
                value = self.env[a]
                if isinstance(value, Ref):
                    refs.append(value)  # a mask the layer holds as 0/1 floats goes in as the map's bool tensor
                    return Slot(len(refs) - 1, self.first[a].dtype if a in self.recast else None)
                return template(value)
            if isinstance(a, BatchDim):
                raise UntraceableError(f"{_what(node)} has no primitive, and a size that follows the batch is one "
                                       "of its arguments")
            if isinstance(a, (list, tuple)):
                return type(a)(template(v) for v in a)
            if isinstance(a, dict):
                return {k: template(v) for k, v in a.items()}
            if isinstance(a, slice):
                return slice(template(a.start), template(a.stop), template(a.step))
            return a

        args, kwargs = template(node.args), template(dict(node.kwargs))
        if not refs:
            raise UntraceableError(f"{_what(node)} makes a tensor from no tensor argument, and has no primitive")
        inputs = [self._extern_shape(self.shape(r)) for r in refs]
        output = self._extern_shape(self._shape(self.node))
        stem = self._label(call.target) if call.kind == "module" else f"{node.name}_fn"
        name = self.names.fresh(stem, "fn")
        declared = inputs[0] if len(inputs) == 1 else "(" + ", ".join(inputs) + ")"
        self.params.append(f"param {name} : extern {declared} -> {output}")
        made = self.first.get(self.node)
        mask = isinstance(made, Tensor) and made.dtype == torch.bool  # the layer gets it as a 0/1 mask
        call = OpCall(call.kind, call.target, args, kwargs, call.item, mask)
        self.extern_nodes.add(self.node)
        if mask:
            self.recast.add(self.node)
        self.externs[name] = call
        self.extern_notes.append(f"{name} (extern): {call.describe()}, derivatives by autograd; give it as "
                                 f"{self.layer}({name}=...) (Layer.from_module does)")
        for role in ("module", "parameters"):
            self.sources[f"{name}.{role}"] = f"extern:{name}:{role}"
        return self._let(f"{name}({', '.join(r.name for r in refs)})", suffix="out")

    def _extern_shape(self, shape: tuple) -> str:
        if any(isinstance(d, BatchDim) and not d.is_batch for d in shape):
            raise UntraceableError("an operation with no primitive on a tensor with a size that follows the batch "
                                   "other than the batch itself")
        return "[" + ", ".join("B" if _is_batch(d) else str(d) for d in shape) + "]"

    def _apply(self, canonical: str, args: list, kwargs: dict) -> Ref:
        handler, names, defaults = table.OPS[canonical]
        bound = table.bind(canonical, tuple(args), kwargs, names, defaults)
        if bound.get("inplace"):
            raise UntraceableError(f"{canonical} in place")
        self.current = canonical
        text = handler(self, bound)
        if re.fullmatch(r"[A-Za-z_]\w*", text):  # the same value (an identity, contiguous ...): no let
            return Ref(text)
        return self._let(text)

    def _label(self, target: str) -> str:
        """A target as the user names it: ``_module0.fc`` of a closure's ``model`` is ``model.fc``."""
        first, dot, rest = target.partition(".")
        return self.labels.get(first, first) + dot + rest

    def _mask_as_numbers(self, node: fx.Node) -> bool:
        """A cast of a bool argument (or a view of one) to the state's dtype and device: ``keep.float()``,
        ``keep.to(x.dtype)``, ``keep.type_as(x)`` where the state is in that dtype."""
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source not in self.index_nodes or not isinstance(self.env[source], Ref):
            return False
        made, was, like = self.first[node], self.first[source], self._state_example()
        return was.dtype == torch.bool and made.dtype == like.dtype and made.device == like.device

    def _let(self, text: str, suffix: str = "v") -> Ref:
        name = self.names.fresh(self.node.name, suffix)
        self.lets.append(f"let {name} = {text}")
        return Ref(name)


@dataclass(frozen=True)
class TupleValue:
    """The result of an operation that returns a tuple of tensors; only its elements are written."""

    node: fx.Node
    size: int


_SPLITS = frozenset({"split", "chunk", "unbind"})


def _is_tuple_of_tensors(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and not isinstance(value, torch.Size) and \
        any(isinstance(v, Tensor) for v in value)


def _element_of(node: fx.Node) -> int | None:
    """``i`` when ``node`` is ``t[i]`` with a constant integer ``i``."""
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 and \
            not node.kwargs and isinstance(node.args[1], int) and not isinstance(node.args[1], bool):
        return node.args[1]
    return None


def _splits(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SPLITS
    return node.op == "call_function" and getattr(node.target, "__name__", None) in _SPLITS and \
        getattr(node.target, "__module__", "") in ("torch", "torch.functional")


def _what(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"the method .{node.target}()"
    if node.op == "call_module":
        return f"the module {node.target}"
    target = node.target
    name = getattr(target, "__name__", None) or repr(target)
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module and module not in ("builtins", "_operator") else name


def _where(node: fx.Node) -> str:
    """Where the user wrote a node: the last frame of its stack trace in the user's code, else its fx name."""
    trace = node.meta.get("stack_trace") or ""
    frames = [f for f in re.findall(r'File "([^"]+)", line (\d+)', trace)
              if "/torch/" not in f[0] and "/fpidsl/tracing/" not in f[0]]
    if frames:
        path, line = frames[-1]
        return f"{path}:{line}"
    return f"the fx node {node.name}"
