"""The authoring subcommands of ``fpidsl``: ``fmt``, ``explain`` and ``lsp`` (registered by :mod:`fpidsl.cli`)."""
from __future__ import annotations

import argparse
import difflib
import os
import sys

EXIT_OK, EXIT_SPEC_ERROR = 0, 1


def add_commands(commands) -> None:
    """Add the authoring subcommands to the ``fpidsl`` argument parser's subparsers."""
    from ..source import FORMATS

    fmt = commands.add_parser("fmt", help="lay out .fpi specs canonically (comments kept); convert YAML <-> .fpi",
                              description="Rewrite each .fpi SPEC in the canonical layout, keeping every comment. "
                                          "With --to, print SPEC (either form) in the other form instead.")
    fmt.add_argument("specs", nargs="+", metavar="SPEC",
                     help="spec files; - reads standard input and prints the result (for editor integrations)")
    fmt.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is not formatted")
    fmt.add_argument("--diff", action="store_true", help="change nothing; print what formatting would change")
    fmt.add_argument("--to", choices=("fpi", "yaml"), help="convert one spec to this form (same AST and graph)")
    fmt.add_argument("-o", "--output", metavar="OUT", help="with --to: write here instead of stdout")
    fmt.set_defaults(run=cmd_fmt)

    explain = commands.add_parser("explain", help="what the compiler understood of a layer: shapes, params, "
                                                  "Lipschitz bound, hoisting, samplewise, backward size")
    explain.add_argument("spec", metavar="SPEC", help="a spec file; - reads standard input")
    explain.add_argument("--format", choices=FORMATS,
                         help="the spec's format (default: by extension; needed for -)")
    explain.add_argument("--layer", metavar="NAME", help="the layer (needed when the spec has several)")
    explain.set_defaults(run=cmd_explain)

    lsp = commands.add_parser("lsp", help="run the language server on stdin/stdout (needs fpidsl[lsp])")
    lsp.set_defaults(run=cmd_lsp)


def write_spec(text: str, path: str) -> None:
    """Replace the spec at ``path`` (through a symbolic link, its target), formatted in place, by ``text``
    atomically, keeping its permissions (:func:`fpidsl.outfile.replace_file`). Errors are :class:`OSError`."""
    from ..outfile import replace_file

    target = os.path.realpath(path)
    mode = os.stat(target).st_mode & 0o777 if os.path.exists(target) else None
    replace_file(target, text, mode)


def _converted_output(text: str, output: str | None, spec: str) -> None:
    """Print a spec that a command made (``fmt --to``, ``trace``), or write it to ``output`` by the rules of
    :func:`fpidsl.outfile.check_output_path` for a spec output: a new file, or an existing regular file not named
    like a spec, never ``spec`` (the input), never through a link, never onto a FIFO, a device or a folder."""
    from ..cli import UsageError
    from ..outfile import OutputError, write_text

    if output is None or output == "-":
        sys.stdout.write(text)
        return
    try:
        write_text(text, output, [spec] if spec and spec != "-" else [], spec_output=True,
                   input_role="the input being converted")
    except OutputError as exc:
        raise UsageError(str(exc)) from None


def cmd_fmt(args: argparse.Namespace) -> int:
    from ..cli import UsageError, report
    from ..errors import FpiError, FpiErrors, printable
    from ..frontend.read import read_source
    from .fmt import format_source

    if args.specs.count("-") > 1:
        raise UsageError("standard input (`-`) can be read only once")
    if args.to is not None:
        if len(args.specs) != 1:
            raise UsageError("--to converts one spec at a time")
        from ..source import format_of
        from .yaml_convert import convert

        if args.specs[0] != "-" and format_of(args.specs[0]) == args.to:  # not read as the other form, wrongly
            raise UsageError(f"{args.specs[0]} is already in the {args.to} form; --to {args.to} converts a spec "
                             f"of the other form" + (" (`fpidsl fmt` lays out .fpi files)" if args.to == "fpi" else ""))
        # from standard input, the spec is in the form it is converted from
        source = read_source(args.specs[0], "yaml" if args.to == "fpi" else "fpi")
        _converted_output(convert(source, args.to), args.output, args.specs[0])
        return EXIT_OK
    if args.output is not None:
        raise UsageError("-o/--output goes with --to; fmt rewrites .fpi files in place")
    status = EXIT_OK
    for path in args.specs:
        if path != "-" and os.path.splitext(path)[1].lower() != ".fpi":
            raise UsageError(f"fmt lays out .fpi files; {path} is not one (convert YAML with --to fpi)")
        source = None
        try:
            source = read_source(path, "fpi")
            text = format_source(source)
        except (FpiError, FpiErrors) as exc:
            report(exc, source=source)
            status = EXIT_SPEC_ERROR
            continue
        if path == "-" and not (args.check or args.diff):
            sys.stdout.write(text)  # standard input: the formatted text on standard output
            continue
        if text == source.text:
            continue
        if args.diff:
            name = printable(source.path)  # a file name's escapes and bidi controls, shown as escapes
            sys.stdout.writelines(difflib.unified_diff(source.text.splitlines(True), text.splitlines(True),
                                                       name, f"{name} (formatted)"))
        if args.check:
            print(printable(f"would reformat {source.path}"), file=sys.stderr)
            status = EXIT_SPEC_ERROR
        elif not args.diff:
            try:
                write_spec(text, path)
            except OSError as exc:
                raise UsageError(f"cannot write {path}: {exc.strerror}") from None
            print(printable(f"reformatted {path}"), file=sys.stderr)
    return status


def cmd_explain(args: argparse.Namespace) -> int:
    from ..cli import UsageError, _read
    from ..compiler import check_source
    from ..errors import printable
    from .explain import explain_layer

    checked = check_source(_read(args.spec, args))
    where = printable(checked.source.path)  # <stdin> for -
    name = args.layer
    if name is None:
        if len(checked.graphs) > 1:
            raise UsageError(f"{where} has {len(checked.graphs)} layers; choose one with --layer "
                             f"({', '.join(checked.graphs)})")
        name = next(iter(checked.graphs))
    if name not in checked.graphs:
        raise UsageError(f"{where} has no layer named {name!r}; it has: {', '.join(checked.graphs)}")
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
