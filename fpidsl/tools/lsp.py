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
import re
from bisect import bisect_right

from lsprotocol import types as lsp
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.uris import to_fs_path
from pygls.workspace import TextDocument

from .. import __version__
from ..errors import FpiError, FpiErrors, FpiWarning
from ..source import Source, Span, line_breaks, normalize_newlines
from . import analysis

_KINDS = {"variable": lsp.CompletionItemKind.Variable, "function": lsp.CompletionItemKind.Function,
          "module": lsp.CompletionItemKind.Class, "keyword": lsp.CompletionItemKind.Keyword,
          "setting": lsp.CompletionItemKind.Property, "value": lsp.CompletionItemKind.EnumMember}


def _utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


_LINE_ENDS = re.compile("\r\n|\r|\n")  # the protocol's line ends


class Positions:
    r"""Converts positions between the compiler's numbering of a document's text and the protocol's.

    The compiler's (:class:`~fpidsl.source.Span`, :mod:`fpidsl.tools.analysis`): 1-based line and character column
    in ``text``, the text of the document as a :class:`~fpidsl.source.Source` holds it: without a leading BOM,
    carriage returns made ``\n``, lines split at the line breaks of its format (for YAML also U+0085, U+2028 and
    U+2029). The protocol's: 0-based line and UTF-16 character in ``document``, the text as the client has it,
    whose lines end at ``\n``, ``\r\n`` or ``\r`` only."""

    def __init__(self, document: str, text: str, breaks: re.Pattern[str]) -> None:
        normalized = normalize_newlines(document)  # the same lines as the protocol's, one character per line end
        self.lines = normalized.split("\n")
        self.line_starts = [0]
        for line in self.lines[:-1]:
            self.line_starts.append(self.line_starts[-1] + len(line) + 1)
        # offset of a character of ``text`` in ``normalized``: one more after a BOM that ``text`` does not hold
        self.shift = 1 if normalized.startswith("\ufeff") and not text.startswith("\ufeff") else 0
        found = list(breaks.finditer(text))
        self.starts = [0] + [m.end() for m in found]  # where each of the compiler's lines starts in ``text``
        self.ends = [m.start() for m in found] + [len(text)]
        self.length = len(text)

    @classmethod
    def of(cls, document: str, source: Source) -> "Positions":
        return cls(document, source.text, line_breaks(source.path, source.format))

    def position(self, line: int, col: int) -> lsp.Position:
        """The protocol position of a 1-based line and character column (past the end of a line: as many
        characters past it)."""
        index, k = max(line, 1) - 1, max(col, 1) - 1
        if index < len(self.starts):
            start, end, more_lines = self.starts[index], self.ends[index], 0
        else:  # past the last line
            start = end = self.length
            more_lines = index - (len(self.starts) - 1)
        offset = min(start + k, end)
        past = start + k - offset
        offset = min(offset + self.shift, self.line_starts[-1] + len(self.lines[-1]))
        number = bisect_right(self.line_starts, offset) - 1
        if more_lines:
            return lsp.Position(line=number + more_lines, character=k)
        character = _utf16(self.lines[number][:offset - self.line_starts[number]])
        return lsp.Position(line=number, character=character + past)

    def range(self, span: Span) -> lsp.Range:
        return lsp.Range(start=self.position(span.line, span.col), end=self.position(span.end_line, span.end_col))

    def compiler_pos(self, position: lsp.Position) -> analysis.Pos:
        """The 1-based (line, character column) of a protocol position."""
        number, character = max(position.line, 0), max(position.character, 0)
        if number >= len(self.lines):  # past the last line
            last, _ = self._line_col(self.length)
            return last + number - (len(self.lines) - 1), character + 1
        text = self.lines[number]
        units, k = 0, 0
        while k < len(text) and units < character:
            units += _utf16(text[k])
            k += 1
        offset = max(self.line_starts[number] + k - self.shift, 0)
        line, col = self._line_col(offset)
        return line, col + max(character - units, 0)

    def _line_col(self, offset: int) -> analysis.Pos:
        index = bisect_right(self.starts, offset) - 1
        return index + 1, offset - self.starts[index] + 1


def diagnostic(positions: Positions, error: FpiError) -> lsp.Diagnostic:
    message = error.message + (f"\nhint: {error.hint}" if error.hint else "")
    return lsp.Diagnostic(range=positions.range(error.span), message=message,
                          severity=lsp.DiagnosticSeverity.Warning if isinstance(error, FpiWarning)
                          else lsp.DiagnosticSeverity.Error, source="fpidsl", code=error.kind)


def document_end(text: str) -> lsp.Position:
    """The protocol position of the end of ``text``."""
    lines = _LINE_ENDS.split(text)
    return lsp.Position(line=len(lines) - 1, character=_utf16(lines[-1]))


_FORMS = {".fpi": ".fpi", ".yaml": ".yaml", ".yml": ".yaml"}


def document_path(uri: str, language_id: str | None) -> str:
    """The path errors are reported under; a document without a spec extension (an unsaved buffer) is read in
    the form its language id names (``fpi`` unless it is ``yaml``)."""
    path = to_fs_path(uri) or uri
    if os.path.splitext(path)[1].lower() in _FORMS:
        return path
    return path + (".yaml" if language_id == "yaml" else ".fpi")


class _Protocol(LanguageServerProtocol):
    """pygls's protocol, answering a request whose params are not valid (a negative position, say) with an
    "Invalid Params" error: pygls only logs it, and the client would wait for the answer for ever."""

    def structure_message(self, data):
        try:
            return super().structure_message(data)
        except JsonRpcInvalidParams as error:
            msg_id = data.get("id")
            if "method" in data and isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool):
                reasons = "; ".join(str(e) for e in _leaves(error.__cause__)) if error.__cause__ else ""
                self._send_response(msg_id, None, lsp.ResponseError(
                    code=error.code, message=f"{error.message}: {reasons}" if reasons else error.message))
                error.answered = True  # type: ignore[attr-defined]
            raise


def _leaves(error: BaseException):
    """The innermost exceptions of an exception group (cattrs's validation errors; the ``exceptiongroup``
    backport's on Python 3.10)."""
    subs = getattr(error, "exceptions", None)
    if isinstance(subs, (list, tuple)):
        for sub in subs:
            yield from _leaves(sub)
    else:
        yield error


class Document:
    """The latest analysis of an open document, with the conversion of its positions."""

    def __init__(self, result: analysis.Analysis, positions: Positions) -> None:
        self.analysis = result
        self.positions = positions


class FpiServer(LanguageServer):
    """The server, with the latest analysis of each open document. A request about a document that is not open
    (never opened, or closed) gets an empty answer: the server does not read files from disk."""

    def __init__(self) -> None:
        super().__init__("fpidsl", __version__, text_document_sync_kind=lsp.TextDocumentSyncKind.Incremental,
                         protocol_cls=_Protocol)
        self.analyses: dict[str, Document] = {}

    def open_document(self, uri: str) -> TextDocument | None:
        """The open document at ``uri``; None when the client has not opened it (pygls would read the file)."""
        document = self.workspace.get_text_document(uri)
        return document if document.version is not None else None  # didOpen always gives a version

    def refresh(self, uri: str) -> None:
        document = self.open_document(uri)
        if document is None:
            self.analyses.pop(uri, None)
            return
        path = document_path(uri, document.language_id)
        text = document.source
        result = analysis.analyze(path, text)
        positions = Positions.of(text, result.source)
        self.analyses[uri] = Document(result, positions)
        diagnostics = [diagnostic(positions, e) for e in result.errors + result.warnings if e.span.path == path]
        self.text_document_publish_diagnostics(lsp.PublishDiagnosticsParams(uri=uri, diagnostics=diagnostics,
                                                                             version=document.version))

    def current(self, uri: str) -> Document | None:
        """The analysis of the open document at ``uri`` (None when it is not open)."""
        if uri not in self.analyses:
            self.refresh(uri)
        return self.analyses.get(uri)

    def report_server_error(self, error: Exception, source) -> None:
        if getattr(error, "answered", False):  # the request got its error response already
            return
        super().report_server_error(error, source)


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
        document = ls.current(params.text_document.uri)
        if document is None:
            return None
        found = analysis.hover(document.analysis, document.positions.compiler_pos(params.position))
        if found is None:
            return None
        return lsp.Hover(contents=lsp.MarkupContent(kind=lsp.MarkupKind.Markdown, value=found.markdown),
                         range=document.positions.range(found.span))

    @server.feature(lsp.TEXT_DOCUMENT_DEFINITION)
    def definition(ls: FpiServer, params: lsp.DefinitionParams) -> lsp.Location | None:
        document = ls.current(params.text_document.uri)
        if document is None:
            return None
        span = analysis.definition(document.analysis, document.positions.compiler_pos(params.position))
        if span is None:
            return None
        return lsp.Location(uri=params.text_document.uri, range=document.positions.range(span))

    @server.feature(lsp.TEXT_DOCUMENT_COMPLETION, lsp.CompletionOptions(trigger_characters=["{", ":", "("]))
    def completion(ls: FpiServer, params: lsp.CompletionParams) -> lsp.CompletionList | None:
        document = ls.open_document(params.text_document.uri)
        if document is None:
            return None
        text = document.source
        # completion reads the text as .fpi: its lines are the protocol's, a BOM is not counted
        positions = Positions(text, normalize_newlines(text).removeprefix("\ufeff"), line_breaks("", "fpi"))
        items = [lsp.CompletionItem(label=c.label, kind=_KINDS[c.kind], detail=c.detail or None)
                 for c in analysis.completions(text, positions.compiler_pos(params.position))]
        return lsp.CompletionList(is_incomplete=False, items=items)

    @server.feature(lsp.TEXT_DOCUMENT_FORMATTING)
    def formatting(ls: FpiServer, params: lsp.DocumentFormattingParams) -> list[lsp.TextEdit] | None:
        from ..frontend.read import decode_source
        from .fmt import format_source

        document = ls.open_document(params.text_document.uri)
        if document is None:
            return None
        path = document_path(params.text_document.uri, document.language_id)
        if os.path.splitext(path)[1].lower() != ".fpi":
            return None
        original = document.source
        try:  # read as `fpidsl fmt` reads a file: a BOM dropped, line ends made "\n"
            source = decode_source(path, original.encode("utf-8", "surrogatepass"), "fpi")
            text = format_source(source)
        except (FpiError, FpiErrors):
            return None  # the diagnostics already say why
        if text == source.text:
            return []
        return [lsp.TextEdit(range=lsp.Range(start=lsp.Position(line=0, character=0), end=document_end(original)),
                             new_text=text)]

    return server


def serve() -> None:
    """Run the server on stdin/stdout until the client exits."""
    build_server().start_io()
