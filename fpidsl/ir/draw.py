"""Draw a layer graph: DOT written from the networkx graph; SVG and PNG through Graphviz's ``dot``."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Iterable

from ..errors import InputError
from ..outfile import OutputError, write_text
from ..source import Span
from .graph import LayerGraph
from .shapes import fmt_shape

_STYLE = {
    "input": 'shape=box, style="rounded,filled", fillcolor="#dbeafe"',
    "state": 'shape=box, style="rounded,filled,bold", fillcolor="#fde68a"',
    "param": 'shape=box, style=filled, fillcolor="#e5e7eb"',
    "const": "shape=plaintext",
    "call": "shape=ellipse",
    "update": 'shape=doubleoctagon, style=filled, fillcolor="#fde68a"',
    "init": "shape=note",
    "output": 'shape=box, style=filled, fillcolor="#bbf7d0"',
}
FORMATS = (".dot", ".svg", ".png")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _label(graph: LayerGraph, nid: str) -> str:
    data = graph.node(nid)
    op = data["op"]
    if op == "call":
        head = data["prim"]
        if data.get("name"):
            head = f"{data['name']} = {head}"
    elif op == "const":
        head = str(data["value"])
    elif op in ("update", "init"):
        head = f"{op} {data['state']}"
    elif op == "output":
        head = "output"
    else:
        head = f"{op} {data.get('name') or ''}".strip()
    shape = data.get("shape")
    dtype = "" if graph.dtype(nid) == "float" else f"{graph.dtype(nid)} "  # an index input
    return head if shape is None or op == "output" else f"{head}\n{dtype}{fmt_shape(shape)}"


def to_dot(graph: LayerGraph) -> str:
    """The DOT text of a layer graph: op and shape on every node, states and params set apart, and
    the dashed edge from each update back to its state (the layer's one cycle)."""
    lines = [f"digraph {_quote(graph.name)} {{", "  rankdir=TB;", '  node [fontname="Helvetica"];']
    for nid in graph.nodes():
        op = graph.node(nid)["op"]
        lines.append(f"  {nid} [label={_quote(_label(graph, nid))}, {_STYLE.get(op, '')}];")
    for nid in graph.nodes():
        for pos, arg in enumerate(graph.args(nid)):
            label = f' [label="{pos}"]' if len(graph.args(nid)) > 1 else ""
            lines.append(f"  {arg} -> {nid}{label};")
    for name, info in graph.states.items():
        if info.update is not None:
            lines.append(f'  {info.update} -> {info.node} [style=dashed, constraint=false, label="next {name}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def output_format(output: str) -> str:
    """The format ``output`` names by its ending (``.dot``, ``.svg`` or ``.png``, any case; a file named just
    ``.dot`` too); another ending is an :class:`~fpidsl.outfile.OutputError` (a usage error)."""
    name = os.path.basename(output).lower()
    for suffix in FORMATS:
        if name.endswith(suffix):
            return suffix
    raise OutputError(f"cannot draw to {output}: the file name must end in .dot, .svg or .png")


def draw_graph(graph: LayerGraph, output: str, inputs: Iterable[str] = ()) -> None:
    """Write ``graph`` to ``output`` (.dot, .svg or .png) with :func:`fpidsl.outfile.write_text`: atomically, and
    never onto a spec, one of ``inputs``, a symbolic link or anything but a regular file. Output-path problems are
    :class:`~fpidsl.outfile.OutputError`; a missing or failing Graphviz is an :class:`InputError`."""
    where = Span.point(output, 1, 1)
    suffix = output_format(output)
    dot_text = to_dot(graph)
    if suffix == ".dot":
        write_text(dot_text, output, inputs)
        return
    exe = shutil.which("dot")
    if exe is None:
        raise InputError(
            f"drawing {suffix[1:].upper()} needs Graphviz's `dot` program, which is not installed",
            where, hint="install the Debian package `graphviz` (apt-get install graphviz), or write .dot",
        )
    # `dot` prints the picture; it is written like the DOT text, not by `dot` straight onto the path
    result = subprocess.run([exe, f"-T{suffix[1:]}"], input=dot_text.encode("utf-8"), capture_output=True)
    if result.returncode != 0:
        raise InputError(f"Graphviz `dot` failed: {result.stderr.decode('utf-8', 'replace').strip()}", where)
    write_text(result.stdout, output, inputs)
