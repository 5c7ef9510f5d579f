"""The command line: ``fpidsl check | compile | graph | fmt | explain | lsp | trace``.

Exit status: 0 success, 1 errors in a spec, 2 wrong usage, 3 an internal error (a bug in fpidsl).
A mistake in a spec never shows a Python traceback; an internal error shows one only with ``--debug``.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from . import __version__
from .errors import FpiError, FpiErrors, as_list, printable, render
from .source import FORMATS, Source

EXIT_OK, EXIT_SPEC_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

INTERNAL_ERROR = (
    "fpidsl: internal error: {what}\n"
    "This is a bug in fpidsl, not in your spec. Please report it with the spec that triggers it"
    " (run again with --debug to see the traceback)."
)


class UsageError(Exception):
    """Wrong use of the command line (exit status 2)."""


def _sources_of(errors: list[FpiError]) -> dict[str, Source]:
    from .frontend.read import read_source

    sources: dict[str, Source] = {}
    for error in errors:
        path = error.span.path
        if path not in sources:
            try:
                sources[path] = read_source(path)
            except FpiError:
                pass
    return sources


def report(exc: BaseException, stream=None, source: Source | None = None) -> int:
    """Print every error held by ``exc`` compiler-style; returns the number printed."""
    stream = stream or sys.stderr
    errors = as_list(exc)
    sources = _sources_of(errors)
    if source is not None:
        sources[source.path] = source
    for error in errors:
        print(render(error, sources.get(error.span.path)), file=stream)
    if len(errors) > 1:
        print(f"{len(errors)} errors", file=stream)
    return len(errors)


# --------------------------------------------------------------------------- commands


def _read(path: str, args: argparse.Namespace) -> Source:
    """The spec at ``path`` (``-``: standard input, with ``--format``); kept on ``args`` for error reports."""
    from .frontend.read import read_source

    args.source = None
    fmt = getattr(args, "format", None)
    if path == "-" and fmt is None:
        raise UsageError("a spec read from standard input (`-`) needs --format fpi or --format yaml")
    args.source = read_source(path, fmt)
    return args.source


def _check(path: str, args: argparse.Namespace):
    """The checked spec; its warnings (legal, likely not meant) are printed on stderr, compiler-style."""
    from .compiler import check_source

    checked = check_source(_read(path, args))
    for warning in checked.warnings:
        print(render(warning, checked.source), file=sys.stderr)
    return checked


def cmd_check(args: argparse.Namespace) -> int:
    status = EXIT_OK
    if args.specs.count("-") > 1:
        raise UsageError("standard input (`-`) can be read only once")
    for path in args.specs:
        try:
            checked = _check(path, args)
        except (FpiError, FpiErrors) as exc:
            report(exc, source=args.source)
            status = EXIT_SPEC_ERROR
            continue
        names = ", ".join(checked.graphs)
        if not args.quiet:
            print(printable(f"{checked.source.path}: ok ({len(checked.graphs)} "
                            f"layer{'s' if len(checked.graphs) != 1 else ''}: {names})"))
        if args.lipschitz:
            from .lipschitz_report import report_lipschitz

            report_lipschitz(checked, sys.stdout)
    return status


def _select(checked, name: str | None):
    if name is None:
        return list(checked.graphs.values())
    if name not in checked.graphs:
        known = ", ".join(checked.graphs)
        raise UsageError(f"{checked.source.path} has no layer named {name!r}; it has: {known}")
    return [checked.graphs[name]]


def cmd_compile(args: argparse.Namespace) -> int:
    if args.output not in (None, "-"):
        _output_ok(args.output, args)  # before the work, not after
    checked = _check(args.spec, args)  # spec errors are reported by main()
    if args.emit == "graph":
        text = "\n\n".join(graph.format() for graph in _select(checked, args.layer)) + "\n"
    elif args.emit == "backward":
        from .passes.differentiate import backward_graph

        text = "\n\n".join(backward_graph(g).format() for g in _select(checked, args.layer)) + "\n"
    else:
        from .codegen.emit import emit_module

        if args.layer is not None:
            _select(checked, args.layer)
        text = emit_module(checked, only=args.layer)
    _write(text, args.output, args)
    return EXIT_OK


def cmd_graph(args: argparse.Namespace) -> int:
    from .ir.draw import draw_graph, output_format
    from .outfile import OutputError
    from .passes.differentiate import backward_graph

    try:
        output_format(args.output)  # before the work, not after
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    _output_ok(args.output, args)
    checked = _check(args.spec, args)  # spec errors are reported by main()
    graphs = _select(checked, args.layer)
    if len(graphs) > 1:
        raise UsageError(
            f"{args.spec} has {len(graphs)} layers; choose one with --layer ({', '.join(checked.graphs)})"
        )
    try:
        draw_graph(backward_graph(graphs[0]) if args.backward else graphs[0], args.output, _inputs(args))
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # Graphviz's `dot` could not be run
        raise UsageError(f"cannot draw {args.output}: {exc.strerror}") from None
    print(printable(f"wrote {args.output}"))
    return EXIT_OK


def _inputs(args: argparse.Namespace) -> list[str]:
    return [args.spec] if args.spec != "-" else []


def _output_ok(output: str, args: argparse.Namespace) -> None:
    """An output path that is not a spec, the input, a symbolic link, a folder or anything but a regular file, in a
    folder that exists (see fpidsl.outfile)."""
    from .outfile import OutputError, check_output_path

    try:
        check_output_path(output, _inputs(args))
    except OutputError as exc:
        raise UsageError(str(exc)) from None


def _write(text: str, output: str | None, args: argparse.Namespace) -> None:
    from .outfile import OutputError, write_text

    if output is None or output == "-":
        sys.stdout.write(text)
        return
    try:
        write_text(text, output, _inputs(args))
    except OutputError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------- argument parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpidsl",
        description="Check and compile fixed-point layer specs (.fpi or YAML) to PyTorch modules.",
    )
    parser.add_argument("--version", action="version", version=f"fpidsl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser("check", help="parse and check specs; report every error")
    check.add_argument("specs", nargs="+", metavar="SPEC", help="spec files; - reads standard input")
    check.add_argument("--format", choices=FORMATS, help="the format of the specs (default: by extension; "
                                                          "needed for -)")
    check.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    check.add_argument("--lipschitz", action="store_true",
                       help="also bound the Lipschitz constant of each layer's map in its states (initial weights)")
    check.set_defaults(run=cmd_check)

    comp = commands.add_parser("compile", help="emit a Python module (or the graph) for a spec")
    comp.add_argument("spec", metavar="SPEC", help="a spec file; - reads standard input")
    comp.add_argument("--format", choices=FORMATS, help="the spec's format (default: by extension; needed for -)")
    comp.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    comp.add_argument("--emit", choices=("python", "graph", "backward"), default="python",
                      help="python (default): an importable module; graph: the checked graph; "
                           "backward: the derived backward graph")
    comp.add_argument("--layer", metavar="NAME", help="only this layer")
    comp.set_defaults(run=cmd_compile)

    graph = commands.add_parser("graph", help="draw a layer's graph as .dot, .svg or .png")
    graph.add_argument("spec", metavar="SPEC", help="a spec file; - reads standard input")
    graph.add_argument("--format", choices=FORMATS, help="the spec's format (default: by extension; needed for -)")
    graph.add_argument("-o", "--output", metavar="FILE", required=True)
    graph.add_argument("--layer", metavar="NAME", help="the layer to draw (needed when the spec has several)")
    graph.add_argument("--backward", action="store_true", help="draw the derived backward graph")
    graph.set_defaults(run=cmd_graph)

    from .tools.commands import add_commands  # fmt, explain, lsp (issue 17)

    add_commands(commands)
    from .tools.trace_command import add_trace_command  # trace (issue 18)

    add_trace_command(commands)
    return parser


def _safe_streams() -> None:
    """Print what the terminal's encoding cannot show (a file name, a spec's text) as escapes, not a crash."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or detached stream: printing will fail on its own
                pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    _safe_streams()
    try:
        return run(args)
    except UsageError as exc:
        print(printable(f"fpidsl: error: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except (FpiError, FpiErrors) as exc:
        report(exc, source=getattr(args, "source", None))
        return EXIT_SPEC_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an internal bug: one line, the traceback only on request
        if args.debug:
            traceback.print_exc()
        print(INTERNAL_ERROR.format(what=f"{type(exc).__name__}: {exc}"), file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
