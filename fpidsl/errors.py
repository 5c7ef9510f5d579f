"""User-facing errors: every one has a kind, a message, a span and an optional hint.

Spec mistakes are raised as (or collected into) :class:`FpiError` subclasses and rendered by
:func:`render` as ``path:line:col: error: message``, the source line, carets and a hint.
"""
from __future__ import annotations

from dataclasses import dataclass

from .source import Source, Span

MAX_REPORTED_ERRORS = 20


class FpiError(Exception):
    """A mistake in a spec. ``kind`` names the family (syntax, name, type, shape, settings, ...)."""

    kind = "error"

    def __init__(self, message: str, span: Span, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.span}: error: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, {self.span!r})"


class InputError(FpiError):
    """The file itself: missing, empty, too large, not UTF-8."""

    kind = "input"


class SyntaxErr(FpiError):
    """Text that the grammar does not accept."""

    kind = "syntax"


class NameErr(FpiError):
    """Unknown, duplicate or shadowing names."""

    kind = "name"


class TypeErr(FpiError):
    """Wrong arity, wrong keyword, wrong kind of argument."""

    kind = "type"


class ShapeErr(FpiError):
    """Shapes that do not agree."""

    kind = "shape"


class StructureErr(FpiError):
    """A layer whose declarations do not form a fixed-point layer (states without updates, ...)."""

    kind = "structure"


class SettingsErr(FpiError):
    """Unknown solver keys or values."""

    kind = "settings"


class SchemaErr(FpiError):
    """YAML that does not follow the spec schema."""

    kind = "schema"


class LimitErr(FpiError):
    """A spec beyond the compiler's size limits (see :mod:`fpidsl.limits`): nesting, chains, expansion."""

    kind = "limit"


class FpiWarning(FpiError):
    """Legal, but likely not what was meant (``max(v, 0)`` reduces over dimension 0); reported, never raised:
    the spec checks, compiles and runs as written. ``render`` labels it ``warning``."""

    kind = "warning"


class FpiErrors(Exception):
    """Several errors found in one file, reported together (at most ``MAX_REPORTED_ERRORS``)."""

    def __init__(self, errors: list[FpiError]):
        errors = sorted(errors, key=lambda e: (e.span.path, e.span.line, e.span.col))
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


class ErrorSink:
    """Collects errors of one pass so that all of them are reported, not only the first."""

    def __init__(self) -> None:
        self.errors: list[FpiError] = []

    def add(self, error: FpiError) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS and not any(
            e.span == error.span and e.message == error.message for e in self.errors
        ):
            self.errors.append(error)

    def check(self) -> None:
        """Raise what was collected, if anything."""
        if self.errors:
            raise FpiErrors(self.errors)


def as_list(exc: BaseException) -> list[FpiError]:
    """The errors held by an :class:`FpiError` or :class:`FpiErrors`."""
    if isinstance(exc, FpiErrors):
        return list(exc.errors)
    if isinstance(exc, FpiError):
        return [exc]
    raise TypeError(f"not an fpidsl error: {exc!r}")


@dataclass(frozen=True)
class _Caret:
    prefix: str
    marks: str


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: every character that is not printable (control characters and
    terminal escapes, format characters, line and paragraph separators, lone surrogates from undecodable file
    names) is written as its Python escape (``\\x1b``, ``\\u2028``); tabs are kept."""
    if text.isprintable():
        return text
    return "".join(_visible(ch) for ch in text)


def _visible(ch: str) -> str:
    if ch == "\t" or ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _caret(line_text: str, span: Span) -> _Caret:
    """The carets under ``span`` on a line that is shown as :func:`printable` makes it."""
    start = max(span.col - 1, 0)
    if span.end_line == span.line:
        end = max(span.end_col - 1, start + 1)
    else:
        end = max(len(line_text.rstrip()), start + 1)
    end = min(end, max(len(line_text), start + 1))
    prefix = "".join("\t" if ch == "\t" else " " * len(_visible(ch)) for ch in line_text[:start])
    width = sum(len(_visible(ch)) for ch in line_text[start:end]) + max(0, end - max(start, len(line_text)))
    return _Caret(prefix, "^" * max(width, 1))


MAX_SHOWN = 160  # characters of a long source line shown around the error
_BEFORE = 60
_ELLIPSIS = "..."


def _window(text: str, span: Span) -> tuple[str, Span]:
    """A long line cut to ``MAX_SHOWN`` characters around the span's start, marked with ``...``, and the span
    moved onto the cut line (clipped at its end)."""
    if len(text) <= MAX_SHOWN:
        return text, span
    start = max(span.col - 1, 0)
    lo = max(0, min(start - _BEFORE, len(text) - MAX_SHOWN))
    hi = min(len(text), lo + MAX_SHOWN)
    head = _ELLIPSIS if lo > 0 else ""
    shown = head + text[lo:hi] + (_ELLIPSIS if hi < len(text) else "")
    col = start - lo + len(head) + 1
    end_col = span.end_col - lo + len(head) if span.end_line == span.line else hi - lo + len(head) + 1
    end_col = min(max(end_col, col + 1), hi - lo + len(head) + 1)
    return shown, Span(span.path, span.line, col, span.line, end_col)


def render(error: FpiError, source: Source | None = None) -> str:
    """Format one error the way a compiler does: location, message, source line, carets, hint. Whatever
    comes from the spec (its path, names, its text) is shown through :func:`printable`."""
    span = error.span
    label = "warning" if isinstance(error, FpiWarning) else "error"
    out = [printable(f"{span.path}:{span.line}:{span.col}: {label}: {error.message}")]
    if source is not None and span.line >= 1:
        text = source.line(span.line)
        if text or span.line <= len(source.lines):
            gutter = f"{span.line:>5}"
            text, span = _window(text, span)
            caret = _caret(text, span)
            out.append(f"{gutter} | {printable(text)}")
            out.append(f"{' ' * len(gutter)} | {caret.prefix}{caret.marks}")
    if error.hint:
        out.append(printable(f"hint: {error.hint}"))
    return "\n".join(out)
