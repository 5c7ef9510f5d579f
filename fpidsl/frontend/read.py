"""Reading a spec: a file (a regular one only; a FIFO or device is refused without blocking), standard input, or
bytes, checked and decoded into a :class:`~fpidsl.source.Source`. Errors are positioned :class:`InputError`s."""
from __future__ import annotations

import os
import stat
import sys

from ..errors import InputError
from ..source import FORMATS, MAX_SOURCE_BYTES, STDIN, STDIN_NAME, Source, Span, line_breaks, normalize_newlines


def read_source(path: str, fmt: str | None = None) -> Source:
    """Read a spec file: at most ``MAX_SOURCE_BYTES``, UTF-8, not empty; ``-`` reads standard input (then
    ``fmt``, ``fpi`` or ``yaml``, is needed). Only a regular file is read: a FIFO, a device or a socket is
    refused without waiting for it. Errors are :class:`FpiError`."""
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
        raise InputError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            _byte_position(path, data, exc.start, fmt),
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


def _byte_position(path: str, data: bytes, offset: int, fmt: str | None) -> Span:
    """The line and column of byte ``offset`` (the first undecodable one) as the compiler counts them elsewhere
    (:class:`~fpidsl.source.Source`): in characters of the text before it, with a BOM dropped, ``\r\n`` and
    a lone ``\r`` counted as one line break, and the line breaks of the format (YAML's NEL, LS and PS too)."""
    before = data[:offset].decode("utf-8", errors="replace")  # valid: decoding stopped at ``offset``
    if before.startswith("\ufeff"):
        before = before[1:]
    lines = line_breaks(path, fmt).split(normalize_newlines(before))
    return Span.point(path, len(lines), len(lines[-1]) + 1)
