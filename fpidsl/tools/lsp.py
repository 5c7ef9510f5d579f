"""``fpidsl lsp``: a language server over stdio, built on pygls (``pip install 'fpidsl[lsp]'``).

Diagnostics (every error of the compiler, at its exact range, with its hint) on open, change and save; hover
(the inferred shape of the name or sub-expression under the cursor, with symbolic dims; the signature of a
built-in or module); go to definition (lets, consts, energies, fns and their parameters, params, inputs,
states); completion (names of the enclosing layer, fns, built-ins, modules after ``param NAME :``, solver
settings inside ``solve``/``backward``); whole-document formatting with :mod:`fpidsl.tools.fmt`.

This module only translates: what the server knows comes from :mod:`fpidsl.tools.analysis`.
"""
from __future__ import annotations

import os

from lsprotocol import types as lsp
from pygls.lsp.server import LanguageServer
from pygls.uris import to_fs_path

from .. import __version__
from ..errors import FpiError, FpiErrors, FpiWarning
from ..source import Source, Span
from . import analysis

_KINDS = {"variable": lsp.CompletionItemKind.Variable, "function": lsp.CompletionItemKind.Function,
          "module": lsp.CompletionItemKind.Class, "keyword": lsp.CompletionItemKind.Keyword,
          "setting": lsp.CompletionItemKind.Property, "value": lsp.CompletionItemKind.EnumMember}


def _utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _position(source: Source, line: int, col: int) -> lsp.Position:
    """The protocol position (0-based line, UTF-16 character) of a 1-based line and character column."""
    text = source.line(line)
    return lsp.Position(line=max(line - 1, 0), character=_utf16(text[:max(col - 1, 0)]) + max(col - 1 - len(text), 0))


def span_range(source: Source, span: Span) -> lsp.Range:
    return lsp.Range(start=_position(source, span.line, span.col), end=_position(source, span.end_line, span.end_col))


def _compiler_pos(source: Source, position: lsp.Position) -> analysis.Pos:
    """The 1-based (line, character column) of a protocol position."""
    text = source.line(position.line + 1)
    units, col = 0, 0
    while col < len(text) and units < position.character:
        units += _utf16(text[col])
        col += 1
    return position.line + 1, col + 1 + max(position.character - units, 0)


def diagnostic(source: Source, error: FpiError) -> lsp.Diagnostic:
    message = error.message + (f"\nhint: {error.hint}" if error.hint else "")
    return lsp.Diagnostic(range=span_range(source, error.span), message=message,
                          severity=lsp.DiagnosticSeverity.Warning if isinstance(error, FpiWarning)
                          else lsp.DiagnosticSeverity.Error, source="fpidsl", code=error.kind)


_FORMS = {".fpi": ".fpi", ".yaml": ".yaml", ".yml": ".yaml"}


def document_path(uri: str, language_id: str | None) -> str:
    """The path errors are reported under; a document without a spec extension (an unsaved buffer) is read in
    the form its language id names (``fpi`` unless it is ``yaml``)."""
    path = to_fs_path(uri) or uri
    if os.path.splitext(path)[1].lower() in _FORMS:
        return path
    return path + (".yaml" if language_id == "yaml" else ".fpi")


class FpiServer(LanguageServer):
    """The server, with the latest analysis of each open document."""

    def __init__(self) -> None:
        super().__init__("fpidsl", __version__, text_document_sync_kind=lsp.TextDocumentSyncKind.Incremental)
        self.analyses: dict[str, analysis.Analysis] = {}

    def refresh(self, uri: str) -> None:
        document = self.workspace.get_text_document(uri)
        path = document_path(uri, document.language_id)
        result = analysis.analyze(path, document.source)
        self.analyses[uri] = result
        diagnostics = [diagnostic(result.source, e) for e in result.errors + result.warnings if e.span.path == path]
        self.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(uri=uri, diagnostics=diagnostics,
                                                                             version=document.version))

    def current(self, uri: str) -> analysis.Analysis:
        if uri not in self.analyses:
            self.refresh(uri)
        return self.analyses[uri]


def build_server() -> FpiServer:
    server = FpiServer()

    @server.feature(lsp.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: FpiServer, params: lsp.DidOpenTextDocumentParams) -> None:
        ls.refresh(params.text_document.uri)

    @server.feature(lsp.TEXT_DOCUMENT_DID_CHANGE)
    def did_change(ls: FpiServer, params: lsp.DidChangeTextDocumentParams) -> None:
        ls.refresh(params.text_document.uri)

    @server.feature(lsp.TEXT_DOCUMENT_DID_SAVE)
    def did_save(ls: FpiServer, params: lsp.DidSaveTextDocumentParams) -> None:
        ls.refresh(params.text_document.uri)

    @server.feature(lsp.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: FpiServer, params: lsp.DidCloseTextDocumentParams) -> None:
        ls.analyses.pop(params.text_document.uri, None)
        ls.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(uri=params.text_document.uri,
                                                                           diagnostics=[]))

    @server.feature(lsp.TEXT_DOCUMENT_HOVER)
    def hover(ls: FpiServer, params: lsp.HoverParams) -> lsp.Hover | None:
        result = ls.current(params.text_document.uri)
        found = analysis.hover(result, _compiler_pos(result.source, params.position))
        if found is None:
            return None
        return lsp.Hover(contents=lsp.MarkupContent(kind=lsp.MarkupKind.Markdown, value=found.markdown),
                         range=span_range(result.source, found.span))

    @server.feature(lsp.TEXT_DOCUMENT_DEFINITION)
    def definition(ls: FpiServer, params: lsp.DefinitionParams) -> lsp.Location | None:
        result = ls.current(params.text_document.uri)
        span = analysis.definition(result, _compiler_pos(result.source, params.position))
        if span is None:
            return None
        return lsp.Location(uri=params.text_document.uri, range=span_range(result.source, span))

    @server.feature(lsp.TEXT_DOCUMENT_COMPLETION, lsp.CompletionOptions(trigger_characters=["{", ":", "("]))
    def completion(ls: FpiServer, params: lsp.CompletionParams) -> lsp.CompletionList:
        document = ls.workspace.get_text_document(params.text_document.uri)
        source = Source(params.text_document.uri, document.source)
        items = [lsp.CompletionItem(label=c.label, kind=_KINDS[c.kind], detail=c.detail or None)
                 for c in analysis.completions(document.source, _compiler_pos(source, params.position))]
        return lsp.CompletionList(is_incomplete=False, items=items)

    @server.feature(lsp.TEXT_DOCUMENT_FORMATTING)
    def formatting(ls: FpiServer, params: lsp.DocumentFormattingParams) -> list[lsp.TextEdit] | None:
        from .fmt import format_source

        document = ls.workspace.get_text_document(params.text_document.uri)
        path = document_path(params.text_document.uri, document.language_id)
        if os.path.splitext(path)[1].lower() != ".fpi":
            return None
        try:
            text = format_source(Source(path, document.source))
        except (FpiError, FpiErrors):
            return None  # the diagnostics already say why
        if text == document.source:
            return []
        lines = document.source.split("\n")
        end = lsp.Position(line=len(lines) - 1, character=_utf16(lines[-1]))
        return [lsp.TextEdit(range=lsp.Range(start=lsp.Position(line=0, character=0), end=end), new_text=text)]

    return server


def serve() -> None:
    """Run the server on stdin/stdout until the client exits."""
    build_server().start_io()
