"""The command line: ``fpidsl check | compile | graph | fmt | explain | lsp``.

Exit status: 0 success, 1 errors in a spec, 2 wrong usage, 3 an internal error (a bug in fpidsl).
A mistake in a spec never shows a Python traceback; an internal error shows one only with ``--debug``.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

from . import __version__
from .errors import FpiError, FpiErrors, as_list, render
from .source import Source

EXIT_OK, EXIT_SPEC_ERROR, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

INTERNAL_ERROR = (
    "fpidsl: internal error: {what}\n"
    "This is a bug in fpidsl, not in your spec. Please report it with the spec that triggers it"
    " (run again with --debug to see the traceback)."
)


class UsageError(Exception):
    """Wrong use of the command line (exit status 2)."""


def _sources_of(errors: list[FpiError]) -> dict[str, Source]:
    from .source import read_source

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


def cmd_check(args: argparse.Namespace) -> int:
    from .compiler import check_file

    status = EXIT_OK
    for path in args.specs:
        try:
            checked = check_file(path)
        except (FpiError, FpiErrors) as exc:
            report(exc)
            status = EXIT_SPEC_ERROR
            continue
        names = ", ".join(checked.graphs)
        if not args.quiet:
            print(f"{path}: ok ({len(checked.graphs)} layer{'s' if len(checked.graphs) != 1 else ''}: {names})")
        if args.lipschitz:
            from .passes.lipschitz import report_lipschitz

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
    from .compiler import check_file

    checked = check_file(args.spec)  # spec errors are reported by main()
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
    _write(text, args.output)
    return EXIT_OK


def cmd_graph(args: argparse.Namespace) -> int:
    from .compiler import check_file
    from .ir.draw import draw_graph

    checked = check_file(args.spec)  # spec errors are reported by main()
    graphs = _select(checked, args.layer)
    if len(graphs) > 1:
        raise UsageError(
            f"{args.spec} has {len(graphs)} layers; choose one with --layer ({', '.join(checked.graphs)})"
        )
    draw_graph(graphs[0], args.output, backward=args.backward)
    print(f"wrote {args.output}")
    return EXIT_OK


def _write(text: str, output: str | None) -> None:
    if output is None or output == "-":
        sys.stdout.write(text)
        return
    try:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror}") from None


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
    check.add_argument("specs", nargs="+", metavar="SPEC")
    check.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    check.add_argument("--lipschitz", action="store_true",
                       help="also bound the Lipschitz constant of each layer's map in its states (initial weights)")
    check.set_defaults(run=cmd_check)

    comp = commands.add_parser("compile", help="emit a Python module (or the graph) for a spec")
    comp.add_argument("spec", metavar="SPEC")
    comp.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    comp.add_argument("--emit", choices=("python", "graph", "backward"), default="python",
                      help="python (default): an importable module; graph: the checked graph; "
                           "backward: the derived backward graph")
    comp.add_argument("--layer", metavar="NAME", help="only this layer")
    comp.set_defaults(run=cmd_compile)

    graph = commands.add_parser("graph", help="draw a layer's graph as .dot, .svg or .png")
    graph.add_argument("spec", metavar="SPEC")
    graph.add_argument("-o", "--output", metavar="FILE", required=True)
    graph.add_argument("--layer", metavar="NAME", help="the layer to draw (needed when the spec has several)")
    graph.add_argument("--backward", action="store_true", help="draw the derived backward graph")
    graph.set_defaults(run=cmd_graph)

    from .tools.commands import add_commands  # fmt, explain, lsp (issue 17)

    add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UsageError as exc:
        print(f"fpidsl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FpiError, FpiErrors) as exc:
        report(exc)
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
