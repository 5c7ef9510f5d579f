"""Writing what the compiler produces to a file, safely.

:func:`write_text` never overwrites a spec (the command's own input, or any ``.fpi``/``.yaml``/``.yml``
file), never writes through a symbolic link (which would silently change another file), and writes
atomically: the text goes to a temporary file in the same folder, which then replaces the target, so that a
failure leaves the old file as it was. Problems are :class:`OutputError`, a usage error for the command line.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable

SPEC_SUFFIXES = (".fpi", ".yaml", ".yml")


class OutputError(Exception):
    """The output path cannot or must not be written."""


def check_output_path(output: str, inputs: Iterable[str] = ()) -> None:
    """Refuse an output that is a spec, one of ``inputs``, a symbolic link or a folder."""
    if os.path.islink(output):
        raise OutputError(f"{output} is a symbolic link; not writing through it (remove it or write elsewhere)")
    if os.path.isdir(output):
        raise OutputError(f"{output} is a folder")
    for spec in inputs:
        try:
            same = os.path.exists(output) and os.path.samefile(output, spec)
        except OSError:
            same = False
        if same:
            raise OutputError(f"{output} is the spec being compiled; not overwriting it")
    if os.path.splitext(output)[1].lower() in SPEC_SUFFIXES:
        raise OutputError(f"{output} is named like a spec ({', '.join(SPEC_SUFFIXES)}); not overwriting "
                          "it with compiled output")


def write_text(text: str, output: str, inputs: Iterable[str] = ()) -> None:
    """Write ``text`` (UTF-8) to ``output`` atomically, after :func:`check_output_path`."""
    check_output_path(output, inputs)
    folder = os.path.dirname(os.path.abspath(output))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".fpidsl-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as open() would have made it, not mkstemp's 0600
        os.replace(temporary, output)
    except OSError as exc:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise OutputError(f"cannot write {output}: {exc.strerror}") from None
