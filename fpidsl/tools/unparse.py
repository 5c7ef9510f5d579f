"""The ``.fpi`` text of AST nodes (either front-end's): expressions with the fewest parentheses that keep their
meaning, shapes, parameter types and one declaration a line. Numbers keep the text they were written with."""
from __future__ import annotations

from ..frontend import ast

# How tightly each form binds (LANGUAGE.md "Expressions" and grammars/fpi.lark): comparison < sum < term
# < factor < power < postfix < atom.
COMPARISON, SUM, TERM, FACTOR, POWER, POSTFIX, ATOM = range(1, 8)
_BINARY = {"+": SUM, "-": SUM, "*": TERM, "/": TERM, "//": TERM, "@": TERM}
_COMPARISONS = frozenset(("<", "<=", ">", ">=", "==", "!="))


def expr(node, need: int = COMPARISON) -> str:
    """``node`` as text; parenthesised when it binds looser than ``need``."""
    text, level = _expr(node)
    return f"({text})" if level < need else text


def _expr(node) -> tuple[str, int]:
    if isinstance(node, ast.Num):
        return node.text, ATOM
    if isinstance(node, ast.Name):
        return node.id, ATOM
    if isinstance(node, ast.Str):
        return f'"{node.value}"', ATOM
    if isinstance(node, ast.BinOp):
        if node.op == "**":
            return f"{expr(node.left, POSTFIX)} ** {expr(node.right, FACTOR)}", POWER
        if node.op in _COMPARISONS:  # not chained: both sides are sums
            return f"{expr(node.left, SUM)} {node.op} {expr(node.right, SUM)}", COMPARISON
        level = _BINARY[node.op]
        return f"{expr(node.left, level)} {node.op} {expr(node.right, level + 1)}", level
    if isinstance(node, ast.Neg):
        operand = expr(node.operand, FACTOR)
        return ("- " if operand.startswith("-") else "-") + operand, FACTOR  # `- -x`, not `--x`
    if isinstance(node, ast.Call):
        return call(node), ATOM
    if isinstance(node, ast.ListExpr):
        return "[" + ", ".join(expr(i) for i in node.items) + "]", ATOM
    if isinstance(node, ast.Index):
        return f"{expr(node.value, POSTFIX)}[{', '.join(_index_item(i) for i in node.items)}]", POSTFIX
    raise TypeError(f"not an expression: {node!r}")


def _index_item(item) -> str:
    if isinstance(item, ast.EllipsisIndex):
        return "..."
    if isinstance(item, ast.Slice):
        text = f"{expr(item.lo) if item.lo else ''}:{expr(item.hi) if item.hi else ''}"
        return text + (f":{expr(item.step)}" if item.step is not None else "")
    return expr(item)


def call(node: ast.Call) -> str:
    args = [expr(a) for a in node.args] + [f"{k.name}={expr(k.value)}" for k in node.kwargs]
    return f"{node.func.id}({', '.join(args)})"


def shape(node: ast.Shape) -> str:
    return "[" + ", ".join(expr(d) for d in node.dims) + "]"


def input_type(decl) -> str:
    """What follows ``input NAME :``: the shape, led by ``int`` or ``bool`` for an index input."""
    return shape(decl.shape) if decl.dtype == "float" else f"{decl.dtype} {shape(decl.shape)}"


def param_type(decl) -> str:
    """What follows ``param NAME :``."""
    if isinstance(decl, ast.ModuleParamDecl):
        return call(decl.module)
    if isinstance(decl, ast.ExternParamDecl):
        return extern_type(decl.extern)
    return f"tensor {shape(decl.shape)}" + (f" = {expr(decl.init)}" if decl.init is not None else "")


def extern_type(node: ast.ExternType) -> str:
    """``extern [samplewise] SHAPE -> SHAPE``, several inputs in parentheses."""
    ins = shape(node.inputs[0]) if len(node.inputs) == 1 else "(" + ", ".join(shape(s) for s in node.inputs) + ")"
    return f"extern {'samplewise ' if node.samplewise else ''}{ins} -> {shape(node.output)}"


def decl(node) -> str:
    """One declaration on one line."""
    if isinstance(node, ast.InputDecl):
        return f"input {node.name} : {input_type(node)}"
    if isinstance(node, ast.StateDecl):
        return f"state {node.name} : {shape(node.shape)}" + (f" = {expr(node.init)}" if node.init else "")
    if isinstance(node, (ast.ModuleParamDecl, ast.TensorParamDecl, ast.ExternParamDecl)):
        return f"param {node.name} : {param_type(node)}"
    for kind, word in ((ast.ConstDecl, "const"), (ast.LetDecl, "let"), (ast.EnergyDecl, "energy"),
                       (ast.UpdateDecl, "update")):
        if isinstance(node, kind):
            return f"{word} {node.name} = {expr(node.value)}"
    if isinstance(node, ast.DescendDecl):
        return f"descend {node.name} on {node.energy.id} step {expr(node.step)}"
    if isinstance(node, ast.OutputDecl):
        return "output " + ", ".join(expr(v) for v in node.values)
    if isinstance(node, ast.SettingsDecl):
        inner = ", ".join(f"{s.key} = {expr(s.value)}" for s in node.settings)
        return f"{node.which} {{ {inner} }}" if inner else f"{node.which} {{}}"
    raise TypeError(f"not a declaration: {node!r}")


def fn_def(node: ast.FnDef) -> str:
    return f"fn {node.name}({', '.join(p.id for p in node.params)}) = {expr(node.body)}"
