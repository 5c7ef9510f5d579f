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


def line_breaks(path: str) -> "re.Pattern[str]":
    """The line breaks of the format of ``path`` (by its extension), as a pattern."""
    return _YAML_BREAKS if os.path.splitext(path)[1].lower() in YAML_SUFFIXES else _FPI_BREAKS


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
    r"""The text of one spec file, decoded and size-checked by :func:`fpidsl.source.read_source`.

    Carriage returns are normalized to ``\n``; ``lines`` are split at the line breaks the file's format
    counts (see :func:`line_breaks`), so that line ``n`` of an error is the line shown with it."""

    path: str
    text: str
    lines: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", normalize_newlines(self.text))
        lines = line_breaks(self.path).split(self.text)
        if lines and lines[-1] == "":
            lines.pop()
        object.__setattr__(self, "lines", tuple(lines))

    def line(self, number: int) -> str:
        """The text of 1-based line ``number`` (empty when out of range)."""
        if 1 <= number <= len(self.lines):
            return self.lines[number - 1]
        return ""


def read_source(path: str) -> Source:
    """Read a spec file: at most ``MAX_SOURCE_BYTES``, UTF-8, not empty. Errors are :class:`FpiError`."""
    from .errors import InputError

    where = Span.point(path, 1, 1)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SOURCE_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"no such file: {path}", where) from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a spec file", where) from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", where) from None
    return decode_source(path, data)


def decode_source(path: str, data: bytes) -> Source:
    """Check and decode the bytes of a spec file."""
    from .errors import InputError

    where = Span.point(path, 1, 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise InputError(
            f"{path} is larger than {MAX_SOURCE_BYTES:,} bytes",
            where,
            hint="a spec is a few lines of text; is this the right file?",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            Span.point(path, line, col),
            hint="save the spec as UTF-8",
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    text = normalize_newlines(text)
    if not text.strip() or all(
        not ln.strip() or ln.lstrip().startswith("#") for ln in text.split("\n")
    ):
        raise InputError(f"{path} is empty: it defines no layer", where,
                         hint="a spec holds at least one `layer NAME { ... }` block")
    return Source(path, text)
