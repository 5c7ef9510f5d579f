"""Compare ASTs by structure, ignoring where they came from.

:func:`strip_spans` turns a node into plain nested dicts and tuples without positions, so that the
``.fpi`` and YAML forms of one layer compare equal (and a failing ``==`` in pytest shows a readable diff).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..source import Span
from . import ast

# Fields that say where a node is, not what it is: every Span, and the file a SpecFile was read from.
_WHERE_FIELDS = {(ast.SpecFile, "path")}


def strip_spans(node: Any, *, keep_text: bool = False) -> Any:
    """A span-free structural form of ``node`` (an AST node, a tuple of them, or a plain value).

    Each dataclass node becomes ``{"node": class name, field: stripped value, ...}`` without its
    :class:`~fpidsl.source.Span` fields and without ``SpecFile.path``. A :class:`~fpidsl.frontend.ast.Num`
    keeps its value and whether it is an ``int`` or a ``float`` (``1`` and ``1.0`` differ), but not how it
    was spelled (``1e-6`` and ``1.0e-6`` are equal) unless ``keep_text`` is true.
    """
    if isinstance(node, Span):
        raise TypeError("strip_spans() was given a bare Span; pass the node that holds it")
    if isinstance(node, ast.Num):
        out = {"node": "Num", "value": node.value, "type": type(node.value).__name__}
        if keep_text:
            out["text"] = node.text
        return out
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        out = {"node": type(node).__name__}
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            if isinstance(value, Span) or (type(node), field.name) in _WHERE_FIELDS:
                continue
            out[field.name] = strip_spans(value, keep_text=keep_text)
        return out
    if isinstance(node, (tuple, list)):
        return tuple(strip_spans(item, keep_text=keep_text) for item in node)
    return node
