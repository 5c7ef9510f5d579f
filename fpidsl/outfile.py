"""Writing what the commands produce to a file, safely.

:func:`write_text` (of text or bytes) never overwrite a spec (the command's own input, or any
``.fpi``/``.yaml``/``.yml`` file), never write through a symbolic link (which would silently change another file),
never write onto anything that is not a regular file (a FIFO would block, a device node would be replaced), take a
path that ends in a slash for the folder it names, and write atomically: the data goes to a temporary file in the
same folder, which then replaces the target, so that a failure leaves the old file as it was. Problems are
:class:`OutputError`, a usage error for the command line.

A command whose output *is* a spec (``fmt --to``, ``trace``) passes ``spec_output=True``: it may create a file
named like a spec, but it still never replaces an existing one.
"""
from __future__ import annotations

import os
import stat
import tempfile
from typing import Iterable

SPEC_SUFFIXES = (".fpi", ".yaml", ".yml")


class OutputError(Exception):
    """The output path cannot or must not be written."""


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _ends_in_separator(path: str) -> bool:
    return path.endswith(os.sep) or bool(os.altsep and path.endswith(os.altsep))


def check_output_path(output: str, inputs: Iterable[str] = (), *, spec_output: bool = False,
                      input_role: str = "the spec being compiled") -> None:
    """Refuse an output that is one of ``inputs``, a spec, a symbolic link, a folder (or a name ending in a slash),
    anything but a regular file, or in a folder that does not exist.

    Without ``spec_output`` any name like a spec is refused; with it (the output is itself a spec) only an existing
    file named like a spec is. ``input_role`` says what ``inputs`` are, in the message."""
    if not output:
        raise OutputError("the output path is empty")
    if _ends_in_separator(output):
        raise OutputError(f"{output} names a folder (it ends in {output[-1]}); give the path of a file")
    try:
        info = os.lstat(output)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror}") from None
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise OutputError(f"{output} is a symbolic link; not writing through it (remove it or write elsewhere)")
        if stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{output} is a folder")
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(f"{output} is {_kind(info.st_mode)}, not a regular file; not writing to it")
        for spec in inputs:
            try:
                same = os.path.samefile(output, spec)
            except OSError:
                same = False
            if same:
                raise OutputError(f"{output} is {input_role}; not overwriting it")
    if os.path.splitext(output)[1].lower() in SPEC_SUFFIXES:
        if not spec_output:
            raise OutputError(f"{output} is named like a spec ({', '.join(SPEC_SUFFIXES)}); not overwriting "
                              "it with compiled output")
        if info is not None:
            raise OutputError(f"{output} is an existing spec; not overwriting it (remove it first, or write to a "
                              "new file)")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {output}: the folder {folder} does not exist")


def replace_file(path: str, data: str | bytes, mode: int | None = None) -> None:
    """Replace (or create) the file at ``path`` by ``data`` (a ``str`` is written as UTF-8) atomically: a temporary
    file in the same folder, then a rename, so a failure leaves the old file whole. ``mode`` is the new file's
    permissions (default: what ``open`` would give under the umask). No checks: errors are :class:`OSError`."""
    fd, temporary = tempfile.mkstemp(prefix=".fpidsl-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        if isinstance(data, str):
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(data)
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # as open() would have made it, not mkstemp's 0600
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def write_text(text: str | bytes, output: str, inputs: Iterable[str] = (), *, spec_output: bool = False,
               input_role: str = "the spec being compiled") -> None:
    """Write ``text`` (UTF-8; or bytes) to ``output`` atomically, after :func:`check_output_path`."""
    check_output_path(output, inputs, spec_output=spec_output, input_role=input_role)
    try:
        replace_file(output, text)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror}") from None

