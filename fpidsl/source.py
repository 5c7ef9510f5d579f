"""Source text and positions: every AST node and graph node carries a :class:`Span`."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

MAX_SOURCE_BYTES = 1_000_000

# The line breaks each format counts: the .fpi grammar only "\n"; PyYAML also NEL, LS and PS. Carriage returns
# ("\r\n" and a lone "\r") are made "\n" when a Source is made, so that both count them as one line break.
_FPI_BREAKS = re.compile("\n")
_YAML_BREAKS = re.compile("[\n\x85\u2028\u2029]")
YAML_SUFFIXES = (".yaml", ".yml")


FORMATS = ("fpi", "yaml")
STDIN = "-"  # the spec path that means standard input
STDIN_NAME = "<stdin>"  # its name in messages


def format_of(path: str) -> str | None:
    """``fpi`` or ``yaml`` by the extension of ``path`` (any letter case); None for another extension."""
    extension = os.path.splitext(path)[1].lower()
    return "yaml" if extension in YAML_SUFFIXES else "fpi" if extension == ".fpi" else None


def line_breaks(path: str, fmt: str | None = None) -> "re.Pattern[str]":
    """The line breaks of a format (by default, that of ``path`` by its extension), as a pattern."""
    return _YAML_BREAKS if (fmt or format_of(path)) == "yaml" else _FPI_BREAKS


def normalize_newlines(text: str) -> str:
    r"""``\r\n`` and a lone ``\r`` as ``\n``."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


@dataclass(frozen=True)
class Span:
    """A region of a source file. Lines and columns are 1-based; ``end_col`` is exclusive."""

    path: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"

    @staticmethod
    def point(path: str, line: int, col: int) -> "Span":
        return Span(path, line, col, line, col + 1)

    def cover(self, other: "Span | None") -> "Span":
        """The smallest span that holds both ``self`` and ``other``."""
        if other is None:
            return self
        start = min((self.line, self.col), (other.line, other.col))
        end = max((self.end_line, self.end_col), (other.end_line, other.end_col))
        return Span(self.path, start[0], start[1], end[0], end[1])


UNKNOWN_SPAN = Span("<generated>", 0, 0, 0, 0)


@dataclass(frozen=True)
class Source:
    r"""The text of one spec file, decoded and size-checked by :func:`fpidsl.frontend.read.read_source`.

    Carriage returns are normalized to ``\n``; ``lines`` are split at the line breaks the file's format
    counts (see :func:`line_breaks`), so that line ``n`` of an error is the line shown with it."""

    path: str
    text: str
    format: str | None = None  # "fpi" or "yaml"; None: by the extension of ``path``
    lines: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", normalize_newlines(self.text))
        lines = line_breaks(self.path, self.format).split(self.text)
        if lines and lines[-1] == "":
            lines.pop()
        object.__setattr__(self, "lines", tuple(lines))

    def line(self, number: int) -> str:
        """The text of 1-based line ``number`` (empty when out of range)."""
        if 1 <= number <= len(self.lines):
            return self.lines[number - 1]
        return ""
