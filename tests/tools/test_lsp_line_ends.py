"""The language server on documents whose positions the compiler and the protocol count differently: lone-CR and
CRLF line ends, a leading BOM, YAML's own line breaks (U+2028, U+0085), plus requests on documents that are not open
and requests with invalid positions.

The protocol counts lines at ``\\n``, ``\\r\\n`` and ``\\r`` and characters in UTF-16 units; the expected positions
here are counted that way in the test's own text (:func:`where`), not asked of the server. The server runs in a
subprocess (``python -m fpidsl lsp``), driven by a small JSON-RPC client over stdio: pygls's client refuses to send
a negative position, which one test needs."""
from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("pygls", reason="the lsp extra (pygls) is part of the dev extra")

from fpidsl.source import Source  # noqa: E402
from fpidsl.tools.analysis import completions  # noqa: E402
from fpidsl.tools.fmt import format_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60
LINE_ENDS = re.compile("\r\n|\r|\n")  # the protocol's


def utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def where(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """The protocol position (0-based line, UTF-16 character) of the nth occurrence of ``needle``."""
    index = -1
    for _ in range(nth + 1):
        index = text.index(needle, index + 1)
    lines = LINE_ENDS.split(text[:index])
    return len(lines) - 1, utf16(lines[-1])


def pos(at: tuple[int, int]) -> dict:
    return {"line": at[0], "character": at[1]}


def start_end(range_: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((range_["start"]["line"], range_["start"]["character"]),
            (range_["end"]["line"], range_["end"]["character"]))


def apply_edits(text: str, edits: list[dict]) -> str:
    """``text`` after the (non-overlapping) edits, positions counted as the protocol counts them."""
    lines = LINE_ENDS.split(text)
    ends = [m.end() for m in LINE_ENDS.finditer(text)]
    starts = [0] + ends

    def offset(p: dict) -> int:
        line = lines[p["line"]]
        units, k = 0, 0
        while k < len(line) and units < p["character"]:
            units += utf16(line[k])
            k += 1
        assert units == p["character"], f"position {p} is not on a character of its line"
        return starts[p["line"]] + k

    for edit in sorted(edits, key=lambda e: (e["range"]["start"]["line"], e["range"]["start"]["character"]),
                       reverse=True):
        text = text[:offset(edit["range"]["start"])] + edit["newText"] + text[offset(edit["range"]["end"]):]
    return text


class Server:
    """``fpidsl lsp`` in a subprocess; every message it sends is kept in order of arrival."""

    def __init__(self, cwd: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "fpidsl", "lsp"], cwd=str(ROOT),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.incoming: queue.Queue = queue.Queue()
        self.received: list[dict] = []
        self.last_id = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        result = self.request("initialize", {"processId": None, "rootUri": cwd.as_uri(), "capabilities": {}})
        assert "result" in result
        self.notify("initialized", {})

    def _read(self) -> None:
        stream = self.process.stdout
        while True:
            length = None
            while True:
                line = stream.readline()
                if not line:
                    self.incoming.put(None)
                    return
                if not line.strip():
                    break
                key, value = line.decode().split(":", 1)
                if key.strip().lower() == "content-length":
                    length = int(value)
            self.incoming.put(json.loads(stream.read(length)))

    def _send(self, message: dict) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        self.process.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.process.stdin.flush()

    def notify(self, method: str, params) -> None:
        self._send({"method": method, "params": params})

    def request(self, method: str, params, timeout: float = TIMEOUT) -> dict:
        """The response (its ``result`` or ``error``) to a request; what came before it is in ``received``."""
        self.last_id += 1
        self._send({"id": self.last_id, "method": method, "params": params})
        return self.wait(lambda m: m.get("id") == self.last_id and "method" not in m, timeout)

    def wait(self, matches, timeout: float = TIMEOUT) -> dict:
        while True:
            try:
                message = self.incoming.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no answer from the server in {timeout} s") from None
            assert message is not None, "the server exited"
            self.received.append(message)
            if matches(message):
                return message

    def diagnostics(self, uri: str) -> list[dict]:
        message = self.wait(lambda m: m.get("method") == "textDocument/publishDiagnostics"
                            and m["params"]["uri"] == uri)
        return message["params"]["diagnostics"]

    def open(self, uri: str, text: str, language_id: str = "fpi") -> list[dict]:
        """Open a document; the diagnostics published for it."""
        self.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": language_id, "version": 1,
                                                              "text": text}})
        return self.diagnostics(uri)

    def at(self, method: str, uri: str, position: tuple[int, int], timeout: float = TIMEOUT) -> dict:
        return self.request(method, {"textDocument": {"uri": uri}, "position": pos(position)}, timeout)

    def format(self, uri: str) -> dict:
        return self.request("textDocument/formatting", {"textDocument": {"uri": uri},
                                                        "options": {"tabSize": 2, "insertSpaces": True}})

    def stop(self) -> None:
        try:
            self.request("shutdown", None, timeout=10)
            self.notify("exit", None)
            self.process.wait(10)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.reader.join(10)
            self.process.stdin.close()
            self.process.stdout.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the tests of this module; each test opens documents of its own (under its tmp_path)."""
    running = Server(tmp_path_factory.mktemp("workspace"))
    yield running
    running.stop()


LAYER_LINES = ["layer   L {", "  input a : [B, 3]  # the input", "  state x : [B, 3]", "  let hidden = tanh(x)",
               "  update x = 0.5*hidden + a", "  solve {  }", "}", ""]


@pytest.mark.parametrize("eol", ["\r", "\r\n"])
def test_formatting_replaces_the_whole_document_whatever_its_line_ends(server, tmp_path, eol):
    text = eol.join(LAYER_LINES)
    uri = (tmp_path / "spec.fpi").as_uri()
    assert server.open(uri, text) == []
    formatted = format_source(Source(str(tmp_path / "spec.fpi"), "\n".join(LAYER_LINES)))
    edits = server.format(uri)["result"]
    # one edit, from the start to the end of the document as the protocol counts its lines: 7 line ends
    assert [start_end(e["range"]) for e in edits] == [((0, 0), (7, 0))]
    assert edits[0]["newText"] == formatted
    assert apply_edits(text, edits) == formatted
    # a document laid out as the formatter lays it out, with these line ends: nothing to change (as `fpidsl fmt`)
    other = (tmp_path / "formatted.fpi").as_uri()
    server.open(other, formatted.replace("\n", eol))
    assert server.format(other)["result"] == []


def test_formatting_a_document_without_a_last_line_end_ends_the_edit_at_its_last_character(server, tmp_path):
    text = "# 𝛉\rlayer   L {\r  input a : [B, 3]\r  state x : [B, 3]\r  update x = a\r}  # 𝛉 wide"
    uri = (tmp_path / "spec.fpi").as_uri()
    server.open(uri, text)
    edits = server.format(uri)["result"]
    assert [start_end(e["range"]) for e in edits] == [((0, 0), (5, len("}  # 𝛉 wide") + 1))]
    assert apply_edits(text, edits) == format_source(Source("spec.fpi", text))


def test_completion_counts_every_line_end(server, tmp_path):
    for name, eol in (("cr", "\r"), ("crlf", "\r\n")):
        text = eol.join(LAYER_LINES)
        uri = (tmp_path / f"{name}.fpi").as_uri()
        server.open(uri, text)
        line, char = where(text, "{  }")
        assert (line, char) == (5, 8)
        items = server.at("textDocument/completion", uri, (line, char + 2))["result"]["items"]
        settings = {item["label"] for item in items}
        assert {"tol", "max_iter", "method", "anderson"} <= settings and "hidden" not in settings, name
        line, char = where(text, "hidden + a")
        names = {item["label"] for item in server.at("textDocument/completion", uri, (line, char))["result"]["items"]}
        assert {"a", "x", "hidden", "tanh"} <= names and "tol" not in names, name


def test_completion_after_a_bom(server, tmp_path):
    text = "\ufefflayer L { input a : [B, 3] state x : [B, 3] update x = a solve {  } }\n"
    uri = (tmp_path / "spec.fpi").as_uri()
    server.open(uri, text)
    line, char = where(text, "{  }")
    assert (line, char) == (0, text.index("{  }"))
    settings = {item["label"] for item in server.at("textDocument/completion", uri, (0, char + 2))["result"]["items"]}
    assert {"tol", "max_iter", "method"} <= settings


def test_analysis_completions_read_carriage_returns_and_a_bom_as_the_compiler_does():
    settings = {c.label for c in completions("layer L {\r  input a : [B, 3]\r  solve { ", (3, 11))}
    assert {"tol", "method"} <= settings
    names = {c.label for c in completions("layer L {\r\n  let h = a  # c\r\n  update x = ", (3, 14))}
    assert "h" in names
    assert {"tol"} <= {c.label for c in completions("\ufefflayer L { solve { ", (1, 20))}


YAML_BREAKS = ["\u2028", "\x85"]


@pytest.mark.parametrize("brk", YAML_BREAKS, ids=["U+2028", "U+0085"])
def test_yaml_positions_are_the_protocols_lines_not_yamls(server, tmp_path, brk):
    """YAML also breaks lines at U+2028 and U+0085; the protocol does not, and the editor shows the line as one."""
    text = (f'fpi: 1  # a{brk}# b\nlayers:\n  L:\n    inputs: {{a: "[B, 3]"}}\n    states: {{x: "[B, 3]"}}\n'
            '    updates: {x: "0.5 * x + foo"}\n')
    uri = (tmp_path / "spec.yaml").as_uri()
    diagnostics = server.open(uri, text, language_id="yaml")
    assert [d["code"] for d in diagnostics] == ["name"]
    line, char = where(text, "foo")
    assert line == 5
    assert start_end(diagnostics[0]["range"]) == ((line, char), (line, char + 3))
    # hover on `0.5 * x`: the expression of line 5 (not of line 4, `states`)
    line, char = where(text, "* x")
    hover = server.at("textDocument/hover", uri, (line, char))["result"]
    assert hover["contents"]["value"] == "expression `0.5 * x` : `[B, 3]`"
    line, char = where(text, "0.5 * x")
    assert start_end(hover["range"]) == ((line, char), (line, char + len("0.5 * x")))
    # a break inside a line of the protocol: what follows it is on that line, after it
    text = f'fpi: 1\nlayers:\n  L:\n    inputs: {{a: "[B, 3]"}}\n    states: {{x: "[B, 3]"}}{brk}    updates: ' \
           '{x: "a + x"}\n'
    server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2},
                                             "contentChanges": [{"text": text}]})
    assert server.diagnostics(uri) == []
    line, char = where(text, "a + x")
    assert (line, char) == (4, 44)
    hover = server.at("textDocument/hover", uri, where(text, "+ x"))["result"]
    assert hover["contents"]["value"] == "expression `a + x` : `[B, 3]`"
    assert start_end(hover["range"]) == ((4, 44), (4, 49))
    location = server.at("textDocument/definition", uri, (4, 48))["result"]
    assert start_end(location["range"]) == (where(text, "x: "), (4, where(text, "x: ")[1] + 1))
    server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 3},
                                             "contentChanges": [{"text": text.replace("a + x", "a + bar")}]})
    diagnostics = server.diagnostics(uri)
    assert [start_end(d["range"]) for d in diagnostics] == [((4, 48), (4, 51))]


def test_a_bom_is_a_character_of_line_0(server, tmp_path):
    text = "\ufefflayer L { input a : [B, 3] state x : [B, 3] update x = 0.5 * x + foo }\n"
    uri = (tmp_path / "spec.fpi").as_uri()
    diagnostics = server.open(uri, text)
    line, char = where(text, "foo")
    assert (line, char) == (0, 66)
    assert start_end(diagnostics[0]["range"]) == ((0, 66), (0, 69))
    hover = server.at("textDocument/hover", uri, where(text, "* x"))["result"]
    assert hover["contents"]["value"] == "expression `0.5 * x` : `[B, 3]`"
    assert start_end(hover["range"]) == (where(text, "0.5 * x"), (0, where(text, "0.5 * x")[1] + 7))
    location = server.at("textDocument/definition", uri, where(text, "x + foo"))["result"]
    assert start_end(location["range"]) == (where(text, "x : [B, 3]"), (0, where(text, "x : [B, 3]")[1] + 1))
    # formatting: as `fpidsl fmt` formats the file (the BOM is dropped), one edit over the whole document
    edits = server.format(uri)["result"]
    assert [start_end(e["range"]) for e in edits] == [((0, 0), (1, 0))]
    assert edits[0]["newText"] == format_source(Source("spec.fpi", text[1:]))


def test_requests_on_a_document_that_is_not_open_get_empty_answers(server, tmp_path):
    missing = (tmp_path / "missing.fpi").as_uri()
    for method in ("textDocument/hover", "textDocument/definition", "textDocument/completion"):
        assert server.at(method, missing, (0, 0)) == {"jsonrpc": "2.0", "id": server.last_id, "result": None}
    assert server.format(missing) == {"jsonrpc": "2.0", "id": server.last_id, "result": None}
    # a document closed by the client is not read again from disk, and gets no diagnostics again
    on_disk = tmp_path / "spec.fpi"
    on_disk.write_text("layer L {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.5 * x + foo\n}\n")
    uri = on_disk.as_uri()
    assert server.open(uri, on_disk.read_text().replace("foo", "a")) == []
    server.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    assert server.diagnostics(uri) == []
    server.received.clear()
    assert server.at("textDocument/hover", uri, (3, 19))["result"] is None
    assert server.format(uri)["result"] is None
    assert [m for m in server.received if m.get("method") == "textDocument/publishDiagnostics"] == []


def test_a_request_with_a_negative_position_gets_an_invalid_params_error(server, tmp_path):
    uri = (tmp_path / "spec.fpi").as_uri()
    text = "layer L {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = a\n}\n"
    server.open(uri, text)
    server.received.clear()
    for position in ((-1, 0), (0, -3)):
        answer = server.at("textDocument/hover", uri, position, timeout=10)
        assert answer["id"] == server.last_id and "result" not in answer
        assert answer["error"]["code"] == -32602  # InvalidParams
        assert answer["error"]["message"].startswith("Invalid Params: Position.")
        assert "data" not in answer["error"] or answer["error"]["data"] is None
    # the server goes on answering, and says nothing else about it
    hover = server.at("textDocument/hover", uri, where(text, "a\n}"))["result"]
    assert hover is not None and "`[B, 3]`" in hover["contents"]["value"]
    assert [m for m in server.received if m.get("method") == "window/showMessage"] == []
