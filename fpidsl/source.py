"""Source text and positions: every AST node and graph node carries a :class:`Span`."""
from __future__ import annotations

import os
import re
import stat
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
    r"""The text of one spec file, decoded and size-checked by :func:`fpidsl.source.read_source`.

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


def read_source(path: str, fmt: str | None = None) -> Source:
    """Read a spec file: at most ``MAX_SOURCE_BYTES``, UTF-8, not empty; ``-`` reads standard input (then
    ``fmt``, ``fpi`` or ``yaml``, is needed). Only a regular file is read: a FIFO, a device or a socket is
    refused without waiting for it. Errors are :class:`FpiError`."""
    from .errors import InputError

    if path == STDIN:
        return read_stdin(fmt)
    where = Span.point(path, 1, 1)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not block
    except FileNotFoundError:
        raise InputError(f"no such file: {path}", where) from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a spec file", where) from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", where) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InputError(f"{path} is a directory, not a spec file", where)
        if not stat.S_ISREG(mode):
            raise InputError(f"{path} is not a regular file (a FIFO, a device or a socket)", where,
                             hint="pass a spec file, or `-` with --format fpi|yaml to read standard input")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}", where) from None
    finally:
        os.close(fd)
    return decode_source(path, data, fmt)


def read_stdin(fmt: str | None) -> Source:
    """The spec on standard input, in format ``fmt`` (``fpi`` or ``yaml``), named ``<stdin>`` in messages."""
    import sys

    from .errors import InputError

    where = Span.point(STDIN_NAME, 1, 1)
    if fmt not in FORMATS:
        raise InputError("a spec read from standard input needs its format", where,
                         hint="add --format fpi or --format yaml")
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise InputError("standard input is closed", where)
    try:
        data = stream.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read standard input: {exc.strerror}", where) from None
    return decode_source(STDIN_NAME, data, fmt)


def decode_source(path: str, data: bytes, fmt: str | None = None) -> Source:
    """Check and decode the bytes of a spec file (of format ``fmt``; by default by its extension)."""
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
    return Source(path, text, fmt)
