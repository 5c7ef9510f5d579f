"""The compiler driver: file → source → AST → checked graphs → lowered layers → Python.

Each step is a function of the previous result: :func:`check_file` runs the front half that ``fpidsl check``
needs (:mod:`fpidsl.passes.pipeline`); :meth:`CheckedSpec.lowered` the lowering passes
(:mod:`fpidsl.passes.lower`); :func:`compile_source` prints the lowered layers (:mod:`fpidsl.codegen.emit`).
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass

from .frontend import ast
from .frontend.read import read_source
from .source import Source


@contextmanager
def paused_gc():
    """Python's cyclic garbage collector paused while the compiler builds its graphs: each collection walks every
    node and edge dict made so far, which doubled compile time (1600 chained lets: 4.6 s with it, 2.3 s without;
    ``python benchmarks/compile_time.py [--with-gc]``). Nested uses are free; what the compiler leaves behind is
    collected as usual afterwards.

    After a large compile (more than :data:`HAND_OVER` new objects) the objects made meanwhile are handed to the
    oldest generation (``gc.freeze()`` then ``gc.unfreeze()``, which moves every tracked object there without a
    walk) before collection resumes: otherwise the first young collection after it walked all of them (a 1 MB
    spec's 1.3 million, about half a second), to promote them to where they end up anyway. A cycle left among
    them is collected by the next full collection."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        # a caller's own frozen objects are left as they are
        if gc.get_count()[0] > HAND_OVER and not gc.get_freeze_count():
            gc.freeze()
            gc.unfreeze()
        gc.enable()


HAND_OVER = 100_000  # new objects (gc.get_count()[0]) past which paused_gc hands them to the oldest generation


@dataclass(frozen=True)
class CheckedSpec:
    """A spec file that parsed and checked clean: its source, AST and one graph per layer."""

    source: Source
    spec: ast.SpecFile
    graphs: dict  # layer name -> fpidsl.ir.graph.LayerGraph, in source order

    @property
    def warnings(self) -> list:
        """The :class:`~fpidsl.errors.FpiWarning` s of every layer, in source order."""
        found = {(w.span, w.message): w for graph in self.graphs.values() for w in graph.warnings}
        return sorted(found.values(), key=lambda w: (w.span.line, w.span.col))

    def lowered(self, lint: bool | None = None) -> dict:
        """Layer name -> its :class:`~fpidsl.passes.lower.LoweredLayer`, in source order (computed once; ``lint``:
        see :func:`~fpidsl.passes.lower.lower`)."""
        from .passes.lower import lower

        cache = self.__dict__.setdefault("_lowered", {})
        if lint or lint not in cache:
            with paused_gc():
                cache[lint] = {name: lower(graph, lint=lint) for name, graph in self.graphs.items()}
        return cache[lint]


def parse_file(path: str) -> tuple[Source, ast.SpecFile]:
    """Read and parse a ``.fpi`` or YAML spec."""
    from .frontend.load import parse_source

    source = read_source(path)
    return source, parse_source(source)


def check_source(source: Source) -> CheckedSpec:
    """Parse and check a spec given as text (the path only names it in errors)."""
    from .frontend.load import parse_source
    from .limits import run_deep
    from .passes.pipeline import check_spec

    def check() -> CheckedSpec:
        spec = parse_source(source)
        return CheckedSpec(source, spec, check_spec(spec))

    with paused_gc():
        return run_deep(check)  # a deep stack for deeply nested specs (see fpidsl.limits)


def compile_source(source: Source, only: str | None = None) -> str:
    """The Python module of a spec given as text: checked, lowered and printed."""
    from .codegen.emit import emit_module

    with paused_gc():
        return emit_module(check_source(source), only)


def check_file(path: str) -> CheckedSpec:
    """Parse and check a spec file; raises :class:`~fpidsl.errors.FpiError` / ``FpiErrors``."""
    return check_source(read_source(path))
