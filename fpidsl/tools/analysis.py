"""What the language server knows about one document, without any LSP types: its errors, the inferred shape of
the value under a position, where a name is declared, and what can be typed at a position.

Positions here are the compiler's: 1-based line and column in characters (:class:`~fpidsl.source.Span`);
:mod:`fpidsl.tools.lsp` converts them to the protocol's 0-based UTF-16 positions.

Shapes come from the checked graphs (every node has a span and, after shape inference, a shape; every edge the
span where the argument is written). When a file has errors, the layers are still built one by one with the
checking passes, so the values that did get a shape can be shown while the file is being fixed.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..errors import FpiError, FpiErrors, as_list
from ..frontend import ast
from ..ir.shapes import fmt_shape
from ..source import Source, Span, normalize_newlines

Pos = tuple[int, int]  # (line, col), 1-based


@dataclass
class Analysis:
    """One version of a document: its errors and, where it parsed, its AST and (possibly partial) graphs."""

    source: Source
    errors: list[FpiError] = field(default_factory=list)
    warnings: list[FpiError] = field(default_factory=list)  # FpiWarning s of a spec that checked
    spec: ast.SpecFile | None = None
    graphs: dict = field(default_factory=dict)


def analyze(path: str, text: str) -> Analysis:
    """Parse and check ``text`` as the spec at ``path`` (its extension picks the form)."""
    from ..compiler import check_source
    from ..frontend.load import parse_source
    from ..frontend.read import decode_source

    result = Analysis(Source(path, text))
    try:
        result.source = decode_source(path, text.encode("utf-8"))
        result.spec = parse_source(result.source)
        checked = check_source(result.source)
        result.graphs = checked.graphs
        result.warnings = list(checked.warnings)
    except (FpiError, FpiErrors) as exc:
        result.errors = as_list(exc)
        if result.spec is not None:
            result.graphs = _partial_graphs(result.spec)
    except Exception as exc:  # noqa: BLE001 - a compiler bug: say so in the editor instead of going silent
        result.errors = [FpiError(f"internal error: {type(exc).__name__}: {exc} (a bug in fpidsl, not in the spec; "
                                  "please report it with the spec)", Span.point(path, 1, 1))]
    return result


def _partial_graphs(spec: ast.SpecFile) -> dict:
    """Each layer's graph as far as the checking passes get, errors ignored (they were reported already)."""
    from ..errors import ErrorSink
    from ..passes.pipeline import check_layer_ast
    from ..passes.resolve import resolve_fns

    graphs = {}
    try:
        sink = ErrorSink()
        fns = resolve_fns(spec, sink)
        for layer in spec.layers:
            try:
                graphs[layer.name] = check_layer_ast(layer, fns, ErrorSink())
            except Exception:  # noqa: BLE001 - a half-built graph of a wrong layer: show what the others know
                continue
    except Exception:  # noqa: BLE001
        return graphs
    return graphs


# --------------------------------------------------------------------------- positions


def contains(span: Span, pos: Pos) -> bool:
    """Whether the character at ``pos`` is inside ``span``."""
    return (span.line, span.col) <= pos < (span.end_line, span.end_col)


def _size(span: Span) -> tuple[int, int]:
    return (span.end_line - span.line, span.end_col - span.col if span.end_line == span.line else 10_000)


def _text(source: Source, span: Span) -> str:
    if span.line == span.end_line:
        return source.line(span.line)[span.col - 1:span.end_col - 1]
    lines = [source.line(span.line)[span.col - 1:]] + [source.line(n) for n in range(span.line + 1, span.end_line)]
    lines.append(source.line(span.end_line)[:span.end_col - 1])
    return " ".join(part.strip() for part in lines)


def _ast_path(node, pos: Pos) -> list:
    """The AST nodes that contain ``pos``, outermost first."""
    path = []

    def visit(item) -> None:
        if isinstance(item, tuple):
            for sub in item:
                visit(sub)
            return
        if not dataclasses.is_dataclass(item) or isinstance(item, type):
            return
        span = getattr(item, "span", None)
        if isinstance(span, Span) and not contains(span, pos) and not isinstance(item, ast.SpecFile):
            return
        path.append(item)
        for f in dataclasses.fields(item):
            visit(getattr(item, f.name))

    visit(node)
    return path


# --------------------------------------------------------------------------- hover


@dataclass(frozen=True)
class Hover:
    span: Span
    markdown: str


def hover(analysis: Analysis, pos: Pos) -> Hover | None:
    """What is under ``pos``: a declared name with its shape, a built-in or module with its signature, or the
    smallest expression holding ``pos`` with its inferred shape (one line per layer where it differs)."""
    if analysis.spec is None:
        return None
    path = _ast_path(analysis.spec, pos)
    layer = next((n for n in path if isinstance(n, ast.Layer)), None)
    shape = next((n for n in reversed(path) if isinstance(n, ast.Shape)), None)
    dim = next((d for d in shape.dims if contains(d.span, pos)), None) if shape is not None else None
    while isinstance(dim, ast.BinOp):  # a size computed from symbols (`H / 2`): the name under the cursor
        dim = next((d for d in (dim.left, dim.right) if contains(d.span, pos)), None)
    if isinstance(dim, ast.Name):
        return Hover(dim.span, f"symbolic dimension **{dim.id}**: one size in the whole layer, taken from the "
                               "inputs at each call")
    setting = next((n for n in reversed(path) if isinstance(n, ast.Setting)), None)
    if setting is not None and contains(setting.key_span, pos):
        block = next(n for n in reversed(path) if isinstance(n, ast.SettingsDecl))
        return Hover(setting.key_span, _setting_text(block.which, setting.key))
    decl = next((n for n in reversed(path) if hasattr(n, "name_span") and not isinstance(n, ast.Keyword)), None)
    if decl is not None and contains(decl.name_span, pos) and not isinstance(decl, (ast.Layer, ast.Setting)):
        return _hover_declared(analysis, layer, decl)
    call = next((n for n in reversed(path) if isinstance(n, ast.Call) and contains(n.func.span, pos)), None)
    if call is not None:
        return _hover_callee(analysis, layer, call)
    return _hover_value(analysis, pos)


def _setting_text(which: str, key: str) -> str:
    from ..passes.settings import CRITERIA, METHODS, MODES, ON_FAIL, SETTING_KEYS

    words = {"method": METHODS, "criterion": CRITERIA, "on_fail": ON_FAIL, "mode": MODES}
    head = f"`{which}` setting **{key}**"
    if key not in SETTING_KEYS:
        return f"{head}: not a setting (the settings are {', '.join(SETTING_KEYS)})"
    if key in words:
        return f"{head}: one of " + ", ".join(f"`{w}`" for w in words[key])
    return f"{head} (docs/LANGUAGE.md, Solver settings)"


def _graph_of(analysis: Analysis, layer: ast.Layer | None):
    return analysis.graphs.get(layer.name) if layer is not None else None


def _declared_shape(graph, decl) -> str | None:
    if graph is None:
        return None
    name = decl.name
    if isinstance(decl, ast.InputDecl) and name in graph.inputs:
        return fmt_shape(graph.shape(graph.inputs[name]))
    if isinstance(decl, (ast.StateDecl, ast.UpdateDecl, ast.DescendDecl)) and name in graph.states:
        return fmt_shape(graph.states[name].shape)
    if isinstance(decl, ast.LetDecl) and name in graph.lets:
        return fmt_shape(graph.shape(graph.lets[name]))
    if isinstance(decl, ast.EnergyDecl) and name in graph.energies:
        return fmt_shape(graph.shape(graph.energies[name]))
    if isinstance(decl, ast.TensorParamDecl) and name in graph.params:
        return fmt_shape(graph.shape(graph.params[name]))
    return None


_DECL_WORDS = {ast.InputDecl: "input", ast.StateDecl: "state", ast.ModuleParamDecl: "param",
               ast.TensorParamDecl: "param", ast.ExternParamDecl: "param", ast.ConstDecl: "const", ast.LetDecl: "let", ast.EnergyDecl: "energy",
               ast.UpdateDecl: "state", ast.DescendDecl: "state", ast.FnDef: "fn"}


def _hover_declared(analysis: Analysis, layer, decl) -> Hover:
    graph = _graph_of(analysis, layer)
    word = _DECL_WORDS.get(type(decl), "name")
    if isinstance(decl, ast.ModuleParamDecl):
        return Hover(decl.name_span, _module_param_text(graph, decl.name) or f"param **{decl.name}**")
    if isinstance(decl, ast.ExternParamDecl):
        from .unparse import extern_type

        return Hover(decl.name_span, f"param **{decl.name}** : `{extern_type(decl.extern)}`, an nn.Module given "
                                     f"at construction: `Layer({decl.name}=module)`")
    if isinstance(decl, ast.FnDef):
        params = ", ".join(p.id for p in decl.params)
        return Hover(decl.name_span, f"fn **{decl.name}**({params}), inlined at each call")
    if isinstance(decl, ast.ConstDecl):
        return Hover(decl.name_span, f"const **{decl.name}** = `{_text(analysis.source, decl.value.span)}`")
    shape = _declared_shape(graph, decl)
    kind = f"{decl.dtype} " if isinstance(decl, ast.InputDecl) and decl.dtype != "float" else ""
    text = f"{word} **{decl.name}**" + (f" : `{kind}{shape}`" if shape else "")
    return Hover(decl.name_span, text)


def _module_param_text(graph, name: str) -> str | None:
    if graph is None or name not in graph.modules:
        return None
    spec = graph.modules[name]
    tensors = [f"{q.split('.', 1)[1]} `{fmt_shape(graph.shape(n))}`" for q, n in graph.params.items()
               if graph.node(n).get("module") == name]
    return f"param **{name}** : `{spec.format()}`\n\n" + ", ".join(tensors)


def _hover_callee(analysis: Analysis, layer, call: ast.Call) -> Hover:
    from ..ir.primitives import MODULE_KINDS, PRIMITIVES

    name = call.func.id
    graph = _graph_of(analysis, layer)
    shape = _shape_at(analysis, call.span)
    result = f"\n\nhere: `{shape}`" if shape else ""
    if graph is not None and name in graph.modules:
        return Hover(call.func.span, (_module_param_text(graph, name) or "") + result)
    if name in MODULE_KINDS:
        return Hover(call.func.span, f"module `{MODULE_KINDS[name].signature()}`")
    prim = PRIMITIVES.get(name)
    if prim is not None and prim.builtin:
        doc = f"\n\n{prim.doc}" if prim.doc else ""
        return Hover(call.func.span, f"built-in `{prim.signature()}`{doc}{result}")
    fn = next((f for f in analysis.spec.fns if f.name == name), None) if analysis.spec else None
    if fn is not None:
        head = f"fn **{fn.name}**({', '.join(p.id for p in fn.params)}) = `{_text(analysis.source, fn.body.span)}`"
        return Hover(call.func.span, head + result)
    return Hover(call.func.span, f"`{name}`{result}")


def _candidates(analysis: Analysis, pos: Pos):
    """(span, layer name, graph, node) for every graph node or argument use whose span holds ``pos``."""
    for name, graph in analysis.graphs.items():
        for nid in graph.nodes():
            span = graph.node(nid).get("span")
            if isinstance(span, Span) and span.path == analysis.source.path and contains(span, pos):
                yield span, name, graph, nid
            for src, use in zip(graph.args(nid), graph.arg_spans(nid)):
                if isinstance(use, Span) and use.path == analysis.source.path and contains(use, pos):
                    yield use, name, graph, src


def _shape_at(analysis: Analysis, span: Span) -> str | None:
    shapes = {fmt_shape(g.shape(n)) for s, _, g, n in _candidates(analysis, (span.line, span.col))
              if s == span and g.shape(n) is not None}
    return " or ".join(sorted(shapes)) if shapes else None


def _hover_value(analysis: Analysis, pos: Pos) -> Hover | None:
    found = [c for c in _candidates(analysis, pos) if c[2].shape(c[3]) is not None
             and c[2].node(c[3])["op"] not in ("update", "output", "init")]
    if not found:
        return None
    best = min(_size(c[0]) for c in found)
    innermost = [c for c in found if _size(c[0]) == best]
    span = innermost[0][0]
    per_layer: dict[str, str] = {}
    for _, layer, graph, nid in innermost:
        per_layer.setdefault(layer, fmt_shape(graph.shape(nid)))
    label = innermost[0][2].label(innermost[0][3])
    what = label if label != "this expression" else "expression"
    snippet = _text(analysis.source, span)
    if len(snippet) > 60:
        snippet = snippet[:57] + "..."
    shapes = set(per_layer.values())
    if len(shapes) == 1:
        text = f"{what} `{snippet}` : `{shapes.pop()}`"
    else:
        text = f"{what} `{snippet}`\n\n" + "\n".join(f"- in {n}: `{s}`" for n, s in per_layer.items())
    return Hover(span, text)


# --------------------------------------------------------------------------- definitions


def definition(analysis: Analysis, pos: Pos) -> Span | None:
    """Where the name under ``pos`` (a use, a callee, an energy after ``on``, a state being updated) is declared."""
    if analysis.spec is None:
        return None
    path = _ast_path(analysis.spec, pos)
    name = _name_under(path, pos)
    if name is None and pos[1] > 1:  # a cursor right after a name
        pos = (pos[0], pos[1] - 1)
        path = _ast_path(analysis.spec, pos)
        name = _name_under(path, pos)
    if name is None:
        return None
    fn = next((n for n in path if isinstance(n, ast.FnDef)), None)
    if fn is not None:
        param = next((p for p in fn.params if p.id == name), None)
        if param is not None:
            return param.span
    layer = next((n for n in path if isinstance(n, ast.Layer)), None)
    if layer is not None:
        for decl in layer.decls:
            if isinstance(decl, (ast.InputDecl, ast.StateDecl, ast.ModuleParamDecl, ast.TensorParamDecl,
                                 ast.ExternParamDecl, ast.ConstDecl, ast.LetDecl, ast.EnergyDecl)) and decl.name == name:
                return decl.name_span
    for fn_def in analysis.spec.fns:
        if fn_def.name == name:
            return fn_def.name_span
    return None


def _name_under(path: list, pos: Pos) -> str | None:
    for node in reversed(path):
        if isinstance(node, ast.Name) and contains(node.span, pos):
            return node.id
        if isinstance(node, ast.Call) and contains(node.func.span, pos):
            return node.func.id
        if isinstance(node, (ast.UpdateDecl, ast.DescendDecl)) and contains(node.name_span, pos):
            return node.name
        if isinstance(node, ast.DescendDecl) and contains(node.energy.span, pos):
            return node.energy.id
    return None


# --------------------------------------------------------------------------- completion


@dataclass(frozen=True)
class Completion:
    label: str
    kind: str  # variable, function, module, keyword, setting, value
    detail: str = ""


_LAYER_HEAD = re.compile(r"^[ \t]*(layer|fn)\b", re.M)
_DECLARED = re.compile(r"\b(input|state|param|const|let|energy)\s+([A-Za-z_][A-Za-z0-9_]*)")
_FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(([^)]*)\)")
_OPEN_SETTINGS = re.compile(r"\b(solve|backward|eval)\s*\{[^}]*\Z")
_PARAM_TYPE = re.compile(r"\bparam\s+[A-Za-z_][A-Za-z0-9_]*\s*:\s*[A-Za-z_]*\Z")
_INPUT_TYPE = re.compile(r"\binput\s+[A-Za-z_][A-Za-z0-9_]*\s*:\s*[A-Za-z_]*\Z")
INPUT_TYPE_DETAILS = {"int": "int64 indices (gather, index_select, Embedding)", "bool": "a mask (where's condition)",
                      "sparse": "a sparse COO or CSR matrix (spmm's A)"}
DECLARATION_KEYWORDS = ("input", "state", "param", "const", "let", "energy", "update", "descend", "output",
                        "solve", "backward", "eval")


def _offset(text: str, pos: Pos) -> int:
    lines = text.split("\n")
    line = min(pos[0], len(lines))
    return sum(len(s) + 1 for s in lines[:line - 1]) + min(pos[1] - 1, len(lines[line - 1]))


def _strip_comments(text: str) -> str:
    return re.sub(r"#[^\n]*", "", text)


def completions(text: str, pos: Pos) -> list[Completion]:
    """What may be typed at ``pos``; read from the text itself, so it works while the file does not parse.

    ``text`` is read as ``.fpi``, as the compiler reads a file: a leading BOM is not counted in ``pos`` and each
    line end (``\\n``, ``\\r\\n`` or a lone ``\\r``) is one."""
    from ..ir.primitives import MODULE_KINDS, PRIMITIVES, TENSOR_INITS
    from ..passes.settings import CRITERIA, METHODS, MODES, ON_FAIL, SETTING_KEYS

    text = normalize_newlines(text.removeprefix("\ufeff"))
    before = _strip_comments(text[:_offset(text, pos)])
    heads = list(_LAYER_HEAD.finditer(before))
    region = before[heads[-1].start():] if heads else before
    if heads and heads[-1].group(1) == "layer" and _OPEN_SETTINGS.search(region):
        return ([Completion(k, "setting", "solver setting") for k in SETTING_KEYS]
                + [Completion(w, "value", "method") for w in METHODS]
                + [Completion(w, "value", "mode") for w in MODES]
                + [Completion(w, "value", "criterion") for w in CRITERIA]
                + [Completion(w, "value", "on_fail") for w in ON_FAIL])
    if _INPUT_TYPE.search(region.split("\n")[-1]):
        return [Completion(k, "keyword", f"input NAME : {k} [...]: {d}") for k, d in INPUT_TYPE_DETAILS.items()]
    if _PARAM_TYPE.search(region.split("\n")[-1]):
        return ([Completion(k, "module", m.signature()) for k, m in MODULE_KINDS.items()]
                + [Completion("tensor", "keyword", "tensor SHAPE [= init]"),
                   Completion("extern", "keyword", "extern [samplewise] SHAPE -> SHAPE: an nn.Module given at "
                                                   "construction (several inputs: extern (SHAPE, ...) -> SHAPE)")])
    out: list[Completion] = []
    whole = _strip_comments(text)
    if heads and heads[-1].group(1) == "layer":
        start = heads[-1].start()
        following = _LAYER_HEAD.search(whole, start + 1)
        body = whole[start:following.start() if following else len(whole)]
        seen = set()
        for kind, name in _DECLARED.findall(body):
            if name not in seen:
                seen.add(name)
                out.append(Completion(name, "variable", kind))
    for name, params in _FN.findall(whole):
        out.append(Completion(name, "function", f"fn {name}({params.strip()})"))
    out += [Completion(n, "function", p.signature()) for n, p in PRIMITIVES.items() if p.builtin]
    out += [Completion(n, "value", "initial value") for n in TENSOR_INITS]
    out += [Completion(k, "keyword") for k in DECLARATION_KEYWORDS]
    return out
