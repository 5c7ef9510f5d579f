"""The language server end to end: `python -m fpidsl lsp` in a subprocess, driven over stdio by pygls's
LanguageClient (a real JSON-RPC client). Expected ranges are found in the test's own text, not asked of the
compiler."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

lsp = pytest.importorskip("lsprotocol.types", reason="the lsp extra (pygls) is part of the dev extra")
from pygls.lsp.client import LanguageClient  # noqa: E402

from fpidsl.tools.fmt import format_source  # noqa: E402
from fpidsl.source import Source  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

BROKEN = """\
layer L {
  input a : [B, 10]
  state x : [B, 10]
  param fc : Linear(20, 10, init_scale=0.1)
  let h = relu(fc(cat([x, a], dim=-1)))
  update x = h + undefined_name
  solve {  tol=1e-6 }
}
"""
FIXED = BROKEN.replace("undefined_name", "a")
TIMEOUT = 60


def where(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """0-based (line, character) of the nth occurrence of needle."""
    index = -1
    for _ in range(nth + 1):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index)
    return line, index - (text.rfind("\n", 0, index) + 1)


class Session:
    """A client, the server process, and the diagnostics it has published (one queue per document)."""

    def __init__(self):
        self.client = LanguageClient("fpidsl-test", "1")
        self.diagnostics: asyncio.Queue = asyncio.Queue()

        @self.client.feature(lsp.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
        def published(params):
            self.diagnostics.put_nowait(params)

    async def start(self, tmp_path: Path):
        await self.client.start_io(sys.executable, "-m", "fpidsl", "lsp", cwd=str(ROOT))
        result = await asyncio.wait_for(self.client.initialize_async(lsp.InitializeParams(
            capabilities=lsp.ClientCapabilities(), root_uri=tmp_path.as_uri(), process_id=None)), TIMEOUT)
        self.client.initialized(lsp.InitializedParams())
        return result

    async def next_diagnostics(self):
        return await asyncio.wait_for(self.diagnostics.get(), TIMEOUT)

    async def stop(self):
        await asyncio.wait_for(self.client.shutdown_async(None), TIMEOUT)
        self.client.exit(None)
        await asyncio.wait_for(self.client.stop(), TIMEOUT)


def run(coroutine):
    return asyncio.run(coroutine)


def test_diagnostics_hover_definition_completion_formatting_over_stdio(tmp_path):
    uri = (tmp_path / "spec.fpi").as_uri()

    async def scenario():
        session = Session()
        init = await session.start(tmp_path)
        caps = init.capabilities
        assert caps.hover_provider and caps.definition_provider and caps.document_formatting_provider
        assert caps.completion_provider is not None

        # open a file with an error: one diagnostic, at the unknown name, of kind `name`
        session.client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            text_document=lsp.TextDocumentItem(uri=uri, language_id="fpi", version=1, text=BROKEN)))
        published = await session.next_diagnostics()
        assert published.uri == uri
        assert len(published.diagnostics) == 1
        diag = published.diagnostics[0]
        line, char = where(BROKEN, "undefined_name")
        assert (diag.range.start.line, diag.range.start.character) == (line, char)
        assert (diag.range.end.line, diag.range.end.character) == (line, char + len("undefined_name"))
        assert diag.code == "name" and diag.source == "fpidsl"
        assert "undefined_name" in diag.message
        assert diag.severity == lsp.DiagnosticSeverity.Error

        # hover still works on the layer's values that did get a shape
        line, char = where(BROKEN, "cat(")
        hover = await session.client.text_document_hover_async(lsp.HoverParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri), position=lsp.Position(line=line, character=char + 1)))
        assert hover is not None and "`[B, 20]`" in hover.contents.value

        # edit: the diagnostics are updated (cleared)
        session.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[lsp.TextDocumentContentChangeWholeDocument(text=FIXED)]))
        published = await session.next_diagnostics()
        assert list(published.diagnostics) == []

        async def hover_at(needle: str, nth: int = 0, offset: int = 0):
            line, char = where(FIXED, needle, nth)
            return await session.client.text_document_hover_async(lsp.HoverParams(
                text_document=lsp.TextDocumentIdentifier(uri=uri),
                position=lsp.Position(line=line, character=char + offset)))

        # hover: a use of a let, a sub-expression, a declared name, a built-in, a module param
        use_of_h = await hover_at("h + a")
        assert "the let h" in use_of_h.contents.value and "`[B, 10]`" in use_of_h.contents.value
        assert (use_of_h.range.start.line, use_of_h.range.start.character) == where(FIXED, "h + a")
        plus = await hover_at("+ a")
        assert plus.contents.value == "expression `h + a` : `[B, 10]`"
        relu = await hover_at("(fc(cat")
        assert relu.contents.value == "the let h `relu(fc(cat([x, a], dim=-1)))` : `[B, 10]`"
        cat = await hover_at("cat(", offset=1)
        assert "built-in `cat(" in cat.contents.value and "here: `[B, 20]`" in cat.contents.value
        state = await hover_at("x : [B, 10]")
        assert state.contents.value == "state **x** : `[B, 10]`"
        module = await hover_at("fc(cat")
        assert "Linear(20, 10, init_scale=0.1)" in module.contents.value and "`[10, 20]`" in module.contents.value

        # go to definition of the use of h: the let's name
        line, char = where(FIXED, "h + a")
        location = await session.client.text_document_definition_async(lsp.DefinitionParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri), position=lsp.Position(line=line, character=char)))
        assert location.uri == uri
        assert (location.range.start.line, location.range.start.character) == where(FIXED, "h = relu")

        # completion: names of the layer and built-ins; settings inside `solve {`
        line, char = where(FIXED, "update")
        completion = await session.client.text_document_completion_async(lsp.CompletionParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri), position=lsp.Position(line=line, character=char)))
        labels = {item.label for item in completion.items}
        assert {"a", "x", "fc", "h", "relu", "cat", "let"} <= labels
        line, char = where(FIXED, "tol")
        completion = await session.client.text_document_completion_async(lsp.CompletionParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri), position=lsp.Position(line=line, character=char)))
        labels = {item.label for item in completion.items}
        assert {"tol", "max_iter", "method", "anderson", "relative"} <= labels and "relu" not in labels

        # formatting: one edit to the formatter's text
        edits = await session.client.text_document_formatting_async(lsp.DocumentFormattingParams(
            text_document=lsp.TextDocumentIdentifier(uri=uri),
            options=lsp.FormattingOptions(tab_size=2, insert_spaces=True)))
        assert len(edits) == 1 and edits[0].new_text == format_source(Source(str(tmp_path / "spec.fpi"), FIXED))
        assert "solve { tol = 1e-6 }" in edits[0].new_text

        # a syntax error: reported at the offending token
        broken = FIXED.replace("let h =", "let h")
        session.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=3),
            content_changes=[lsp.TextDocumentContentChangeWholeDocument(text=broken)]))
        published = await session.next_diagnostics()
        assert [d.code for d in published.diagnostics] == ["syntax"]
        line, char = where(broken, "relu(")
        start = published.diagnostics[0].range.start
        assert (start.line, start.character) == (line, char)
        await session.stop()

    run(scenario())


def test_incremental_edit_and_wide_characters(tmp_path):
    """A change sent as a range edit (the way editors send keystrokes); a character that is two UTF-16 units
    (the protocol's default position encoding) gets a range two units long."""
    uri = (tmp_path / "wide.fpi").as_uri()
    text = "# 𝛉 is wide\nlayer L {\n  input a : [B, 10]\n  state x : [B, 10]\n  update x = a\n}\n"

    async def scenario():
        session = Session()
        await session.start(tmp_path)
        session.client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            text_document=lsp.TextDocumentItem(uri=uri, language_id="fpi", version=1, text=text)))
        assert list((await session.next_diagnostics()).diagnostics) == []
        # type "q" after "update x = a" -> "update x = aq": an unknown name at line 4, characters 13..15
        line, char = where(text, "a\n}")
        session.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[lsp.TextDocumentContentChangePartial(
                range=lsp.Range(start=lsp.Position(line=line, character=char + 1),
                                end=lsp.Position(line=line, character=char + 1)), text="q")]))
        published = await session.next_diagnostics()
        assert [d.code for d in published.diagnostics] == ["name"]
        assert published.diagnostics[0].range.start == lsp.Position(line=line, character=char)
        assert published.diagnostics[0].range.end == lsp.Position(line=line, character=char + 2)
        # an unsaved buffer (no file, no extension) is read as .fpi
        untitled = "untitled:Untitled-1"
        session.client.text_document_did_open(lsp.DidOpenTextDocumentParams(
            text_document=lsp.TextDocumentItem(uri=untitled, language_id="fpi", version=1, text=text)))
        published = await session.next_diagnostics()
        assert published.uri == untitled and list(published.diagnostics) == []
        # an unexpected wide character: its range is two UTF-16 units long
        session.client.text_document_did_change(lsp.DidChangeTextDocumentParams(
            text_document=lsp.VersionedTextDocumentIdentifier(uri=uri, version=3),
            content_changes=[lsp.TextDocumentContentChangeWholeDocument(text=text.replace("layer L", "layer L𝛉"))]))
        published = await session.next_diagnostics()
        assert [d.code for d in published.diagnostics] == ["syntax"]
        assert published.diagnostics[0].range == lsp.Range(start=lsp.Position(line=1, character=7),
                                                            end=lsp.Position(line=1, character=9))
        await session.stop()

    run(scenario())
