"""The checking pipeline: AST → one checked, shape-inferred :class:`~fpidsl.ir.graph.LayerGraph` per layer.

The passes, in order (each a function of the previous result and an :class:`~fpidsl.errors.ErrorSink`):

1. :func:`~fpidsl.passes.resolve.resolve_fns` and :func:`~fpidsl.passes.build_graph.check_fn_bodies`
   (file level, once), then per layer
2. :func:`~fpidsl.passes.resolve.resolve_layer`: names, scopes, consts, one update per state;
3. :func:`~fpidsl.passes.build_graph.build_graph`: AST → graph (lowering, fn inlining);
4. :func:`~fpidsl.passes.check_dtypes.check_dtypes` (int and bool inputs only where an index is expected), then
   :func:`~fpidsl.passes.infer_shapes.infer_shapes`;
5. :func:`~fpidsl.passes.check_layer.check_layer`: checks that need shapes;
   :func:`~fpidsl.passes.check_python_names.check_python_names`: params that would shadow module attributes;
6. :func:`~fpidsl.passes.settings.check_settings` for ``solve`` and ``backward``.

Every error of the file is collected (at most ``MAX_REPORTED_ERRORS``) and raised together as
:class:`~fpidsl.errors.FpiErrors`; a clean file's graphs are linted before they are returned.
"""
from __future__ import annotations

from ..errors import ErrorSink, NameErr
from ..frontend import ast
from ..ir.graph import LayerGraph
from .build_graph import build_graph, check_fn_bodies
from .check_dtypes import check_dtypes
from .check_layer import check_layer
from .check_python_names import check_python_names
from .infer_shapes import infer_shapes
from .resolve import FnTable, resolve_fns, resolve_layer
from .settings import check_settings

GRAPH_PASSES = (check_dtypes, infer_shapes, check_layer, check_python_names)


def check_spec(spec: ast.SpecFile) -> dict[str, LayerGraph]:
    """Check a parsed file; its layers' graphs by name, in source order."""
    sink = ErrorSink()
    fns = resolve_fns(spec, sink)
    check_fn_bodies(fns, sink)
    graphs: dict[str, LayerGraph] = {}
    for layer in spec.layers:
        if layer.name in graphs:
            sink.add(NameErr(f"layer {layer.name} is already defined at line {graphs[layer.name].span.line}",
                             layer.name_span, hint="layers of a file have different names"))
            continue
        graphs[layer.name] = check_layer_ast(layer, fns, sink)
    sink.check()
    for graph in graphs.values():
        graph.lint()
    return graphs


def check_layer_ast(layer: ast.Layer, fns: FnTable, sink: ErrorSink) -> LayerGraph:
    """The per-layer passes; errors go to ``sink``."""
    scope = resolve_layer(layer, fns, sink)
    graph = build_graph(scope, fns, sink)
    for run in GRAPH_PASSES:
        run(graph, sink)
    graph.solve, graph.solve_spans = check_settings(scope.settings.get("solve"), scope.const_lookup, sink)
    graph.backward, graph.backward_spans = check_settings(scope.settings.get("backward"), scope.const_lookup, sink)
    graph.eval_solve, graph.eval_spans = check_settings(scope.settings.get("eval"), scope.const_lookup, sink,
                                                        base=graph.solve)
    return graph
