"""Where an undecodable byte of a spec is reported: at the line and column the rest of the compiler would give
it (:class:`fpidsl.source.Source`), counted in characters, with ``\\n``, ``\\r\\n`` and a lone ``\\r`` as line
breaks (in YAML also NEL, LS and PS), after a byte-order mark."""
from __future__ import annotations

import pytest

from fpidsl.cli import main
from fpidsl.errors import InputError
from fpidsl.frontend.read import decode_source


def _position(path: str, data: bytes) -> tuple[int, int]:
    with pytest.raises(InputError) as info:
        decode_source(path, data)
    error = info.value
    assert error.kind == "input"
    offset = data.index(b"\xff")
    assert error.message == f"{path} is not UTF-8 text (byte 0xff at offset {offset})"
    return error.span.line, error.span.col


@pytest.mark.parametrize("path, data, where", [
    # three two-byte characters before the byte: column 9 (characters), not 12 (bytes)
    ("t.fpi", "layer L {\n  # ééé ".encode() + b"\xff\n}\n", (2, 9)),
    ("t.fpi", "layer L {\n  # \U0001f600 ".encode() + b"\xff\n}\n", (2, 7)),  # one character of four bytes (10 bytes)
    ("t.fpi", b"\xef\xbb\xbf# \xff\n", (1, 3)),  # the BOM is dropped before positions are counted
    ("t.yaml", "fpi: 1\u0085# ".encode() + b"\xff\n", (2, 3)),  # YAML's NEL is a line break
])
def test_the_column_counts_characters(path, data, where):
    assert _position(path, data) == where


def test_a_lone_carriage_return_ends_a_line():
    assert _position("t.fpi", b"layer L {\r  # x \xff\r}\r") == (2, 7)
    assert _position("t.fpi", b"layer L {\r\n\r\n  # x \xff\r\n}\r\n") == (3, 7)  # \r\n: one line break
    assert _position("t.fpi", b"a\r\rb\xff") == (3, 2)


def test_the_command_shows_the_position(tmp_path, capsys):
    spec = tmp_path / "r.fpi"
    spec.write_bytes("layer L {\r  # ééé ".encode() + b"\xff\r}\r")
    assert main(["check", str(spec)]) == 1
    assert capsys.readouterr().err.startswith(
        f"{spec}:2:9: error: {spec} is not UTF-8 text (byte 0xff at offset 21)\n")
