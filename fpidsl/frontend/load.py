"""Parse a spec of either form, chosen by the file's extension."""
from __future__ import annotations

import os

from ..errors import InputError
from ..limits import run_deep
from ..source import Source, Span, format_of
from . import ast
from .parser import parse_fpi
from .yaml_loader import parse_yaml

FPI_EXTENSIONS = (".fpi",)
YAML_EXTENSIONS = (".yaml", ".yml")


def parse_source(source: Source) -> ast.SpecFile:
    """Parse ``source`` with the ``.fpi`` grammar or as YAML: by its ``format``, else by its extension (in any
    letter case)."""
    extension = os.path.splitext(source.path)[1].lower()
    fmt = source.format or format_of(source.path)
    if fmt == "fpi":
        return run_deep(parse_fpi, source)  # deeply nested text needs a deep stack (fpidsl.limits)
    if fmt == "yaml":
        return run_deep(parse_yaml, source)
    accepted = ", ".join(FPI_EXTENSIONS + YAML_EXTENSIONS)
    found = f"`{extension}`" if extension else "no extension"
    raise InputError(
        f"cannot tell the format of {source.path}: a spec file ends in {accepted}, this one has {found}",
        Span.point(source.path, 1, 1),
        hint="name `.fpi` files for the language and `.yaml`/`.yml` files for the YAML form",
    )
