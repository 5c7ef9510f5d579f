"""The authoring subcommands of ``fpidsl``: ``fmt``, ``explain`` and ``lsp`` (registered by :mod:`fpidsl.cli`)."""
from __future__ import annotations

import argparse
import difflib
import os
import sys

EXIT_OK, EXIT_SPEC_ERROR = 0, 1


def add_commands(commands) -> None:
    """Add the authoring subcommands to the ``fpidsl`` argument parser's subparsers."""
    fmt = commands.add_parser("fmt", help="lay out .fpi specs canonically (comments kept); convert YAML <-> .fpi",
                              description="Rewrite each .fpi SPEC in the canonical layout, keeping every comment. "
                                          "With --to, print SPEC (either form) in the other form instead.")
    fmt.add_argument("specs", nargs="+", metavar="SPEC")
    fmt.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is not formatted")
    fmt.add_argument("--diff", action="store_true", help="change nothing; print what formatting would change")
    fmt.add_argument("--to", choices=("fpi", "yaml"), help="convert one spec to this form (same AST and graph)")
    fmt.add_argument("-o", "--output", metavar="OUT", help="with --to: write here instead of stdout")
    fmt.set_defaults(run=cmd_fmt)

    explain = commands.add_parser("explain", help="what the compiler understood of a layer: shapes, params, "
                                                  "Lipschitz bound, hoisting, samplewise, backward size")
    explain.add_argument("spec", metavar="SPEC")
    explain.add_argument("--layer", metavar="NAME", help="the layer (needed when the spec has several)")
    explain.set_defaults(run=cmd_explain)

    lsp = commands.add_parser("lsp", help="run the language server on stdin/stdout (needs fpidsl[lsp])")
    lsp.set_defaults(run=cmd_lsp)


def cmd_fmt(args: argparse.Namespace) -> int:
    from ..cli import UsageError, report, _write
    from ..errors import FpiError, FpiErrors
    from ..source import read_source
    from .fmt import format_source

    if args.to is not None:
        if len(args.specs) != 1:
            raise UsageError("--to converts one spec at a time")
        from .yaml_convert import convert

        _write(convert(read_source(args.specs[0]), args.to), args.output)
        return EXIT_OK
    if args.output is not None:
        raise UsageError("-o/--output goes with --to; fmt rewrites .fpi files in place")
    status = EXIT_OK
    for path in args.specs:
        if os.path.splitext(path)[1].lower() != ".fpi":
            raise UsageError(f"fmt lays out .fpi files; {path} is not one (convert YAML with --to fpi)")
        try:
            source = read_source(path)
            text = format_source(source)
        except (FpiError, FpiErrors) as exc:
            report(exc)
            status = EXIT_SPEC_ERROR
            continue
        if text == source.text:
            continue
        if args.diff:
            sys.stdout.writelines(difflib.unified_diff(source.text.splitlines(True), text.splitlines(True),
                                                       path, f"{path} (formatted)"))
        if args.check:
            print(f"would reformat {path}", file=sys.stderr)
            status = EXIT_SPEC_ERROR
        elif not args.diff:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            print(f"reformatted {path}", file=sys.stderr)
    return status


def cmd_explain(args: argparse.Namespace) -> int:
    from ..cli import UsageError
    from ..compiler import check_file
    from .explain import explain_layer

    checked = check_file(args.spec)
    name = args.layer
    if name is None:
        if len(checked.graphs) > 1:
            raise UsageError(f"{args.spec} has {len(checked.graphs)} layers; choose one with --layer "
                             f"({', '.join(checked.graphs)})")
        name = next(iter(checked.graphs))
    if name not in checked.graphs:
        raise UsageError(f"{args.spec} has no layer named {name!r}; it has: {', '.join(checked.graphs)}")
    sys.stdout.write(explain_layer(checked, name))
    return EXIT_OK


def cmd_lsp(args: argparse.Namespace) -> int:
    from ..cli import UsageError

    try:
        from .lsp import serve
    except ImportError as exc:
        raise UsageError(f"the language server needs pygls ({exc}); install it with "
                         "`pip install 'fpidsl[lsp]'`") from None
    serve()
    return EXIT_OK
