"""``fpidsl trace FILE.py:NAME -o SPEC.fpi``: a PyTorch map in a Python file written as a ``.fpi`` spec.

``NAME`` is an ``nn.Module`` class (built with ``--init KEY=VALUE`` keyword arguments) or a function
``g(x, *args)``. ``--shape ARG=8,16`` gives the example shape of each tensor argument of its ``forward`` (the
first one is the state; dimension 0 is the batch), ``--value ARG=0.5`` a non-tensor argument; the example
tensors are drawn from a normal distribution (``--seed``). The file is imported (it runs: trace only files you
trust). The spec is what :func:`fpidsl.trace` compiles; it checks clean and compiles to the same layer.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import math
import os
import re
import sys

from ..frontend.numbers import INT_MAX

EXIT_OK, EXIT_SPEC_ERROR = 0, 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed's range


def add_trace_command(commands) -> None:
    trace = commands.add_parser("trace", help="write a PyTorch map (nn.Module class or function) as a .fpi spec",
                                description=__doc__.split("\n\n")[1])
    trace.add_argument("target", metavar="FILE.py:NAME", help="a Python file and the module class or function in it")
    trace.add_argument("--shape", action="append", default=[], metavar="ARG=D0,D1,...",
                       help="the example shape of a tensor argument (one per tensor argument; the first is the state)")
    trace.add_argument("--value", action="append", default=[], metavar="ARG=LITERAL",
                       help="a non-tensor argument's value (a Python literal)")
    trace.add_argument("--init", action="append", default=[], metavar="KEY=LITERAL",
                       help="a keyword argument of the module class's constructor (a Python literal)")
    trace.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    trace.add_argument("--seed", type=int, default=0, help="the seed of the example tensors (default 0)")
    trace.add_argument("--name", help="the layer's name (default: the class or function name)")
    trace.add_argument("-o", "--output", metavar="OUT.fpi", help="write here instead of stdout")
    trace.set_defaults(run=cmd_trace)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    from ..cli import UsageError

    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"{flag} {item!r}: expected NAME=VALUE")
        if key in out:
            raise UsageError(f"{flag} {key} given twice")
        out[key] = value
    return out


def _literal(text: str, flag: str, key: str):
    from ..cli import UsageError

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # TypeError: {[]: 1}, unhashable
        raise UsageError(f"{flag} {key}={text}: not a Python literal (a number, a string in quotes, a list ...)") from None


def _shape(text: str, key: str) -> tuple[int, ...]:
    from ..cli import UsageError

    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"--shape {key}={text}: expected positive sizes separated by commas (8,16)")
    if any(d > INT_MAX for d in dims):  # torch's sizes are 64-bit integers, like the compiler's numbers
        raise UsageError(f"--shape {key}={text}: a size is at most {INT_MAX:,}")
    return dims


def _seed(seed: int) -> int:
    """``--seed``: what :meth:`torch.Generator.manual_seed` takes (64 bits, signed or not)."""
    from ..cli import UsageError

    if not SEED_MIN <= seed <= SEED_MAX:
        raise UsageError(f"--seed {seed}: a seed is an integer from {SEED_MIN:,} to {SEED_MAX:,} (64 bits)")
    return seed


_FRAME = re.compile(r'File "([^"\n]+)", line (\d+), in (\S+)')


def _without_fx_traceback(message: str, path: str) -> str:
    """An error of the traced graph without what torch.fx appends to it: the node it was executing ("While
    executing %add ..."), the Python traceback of where the node was recorded ("Original traceback: File ...")
    and a pointer to tlparse. A parenthesis that the cut part would have closed is closed. Where the traceback
    has a line of the traced file ``path``, the message ends with it (its last one: ``at model.py:3, in g``)."""
    lines = message.split("\n")
    cut = next((i for i, line in enumerate(lines)
                if line.startswith(("While executing ", "Original traceback:", "Use tlparse "))), None)
    if cut is None:
        return message
    kept = "\n".join(lines[:cut]).rstrip()
    kept += ")" * max(kept.count("(") - kept.count(")"), 0)
    where = [(line, function) for file, line, function in _FRAME.findall("\n".join(lines[cut:]))
             if _same_file(file, path)]
    return f"{kept} at {path}:{where[-1][0]}, in {where[-1][1]}" if where else kept


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _load_target(target: str):
    from ..cli import UsageError

    path, sep, name = target.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise UsageError(f"{target}: expected FILE.py:NAME (a Python file and a class or function in it)")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(f"fpidsl_traced_{abs(hash(os.path.abspath(path)))}", path)
    if spec is None or spec.loader is None:  # a name Python cannot import: not .py (nor .pyc, nor an extension)
        raise UsageError(f"{path}: not a Python file (expected FILE.py:NAME)")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: its error in one line
        raise UsageError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    finally:
        sys.path.pop(0)
    if not hasattr(module, name):
        raise UsageError(f"{path} has no {name}")
    return getattr(module, name)


def cmd_trace(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from ..cli import UsageError
    from ..errors import printable
    from ..tracing import UntraceableError, trace_map
    from .commands import _converted_output

    obj = _load_target(args.target)
    inits = {k: _literal(v, "--init", k) for k, v in _pairs(args.init, "--init").items()}
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        try:
            f = obj(**inits)
        except Exception as exc:
            raise UsageError(f"{obj.__name__}({', '.join(f'{k}={v!r}' for k, v in inits.items())}) failed: "
                             f"{type(exc).__name__}: {exc}") from None
    elif callable(obj) and not isinstance(obj, type):
        if inits:
            raise UsageError("--init is for a module class; this is a function")
        f = obj
    else:
        raise UsageError(f"{args.target} is not an nn.Module class or a function")
    dtype = getattr(torch, args.dtype)
    shapes = {k: _shape(v, k) for k, v in _pairs(args.shape, "--shape").items()}
    values = {k: _literal(v, "--value", k) for k, v in _pairs(args.value, "--value").items()}
    both = [k for k in shapes if k in values]
    if both:
        raise UsageError(f"{both[0]} is given both --shape (a tensor) and --value (a non-tensor): give one")
    seed = _seed(args.seed)
    names = [p for p in inspect.signature(f.forward if isinstance(f, nn.Module) else f).parameters.values()]
    known = {p.name for p in names}
    for key in (*shapes, *values):
        if key not in known:
            raise UsageError(f"{args.target} takes no argument {key} (it takes {', '.join(p.name for p in names)})")
    if not names or names[0].name not in shapes:
        raise UsageError(f"give the state's example shape: --shape {names[0].name if names else 'x'}=BATCH,...")
    generator = torch.Generator().manual_seed(seed)
    example = []
    for p in names:
        if p.name in shapes:
            try:
                example.append(torch.randn(shapes[p.name], generator=generator, dtype=dtype))
            except (RuntimeError, MemoryError):  # a size the machine cannot hold: the user's, not a bug
                size = math.prod(shapes[p.name])
                raise UsageError(f"--shape {p.name}={','.join(map(str, shapes[p.name]))}: cannot make an example of "
                                 f"{size:,} numbers ({size * dtype.itemsize:,} bytes) on this machine") from None
        elif p.name in values:
            example.append(values[p.name])
        elif p.default is not inspect.Parameter.empty:
            break
        else:
            raise UsageError(f"give the argument {p.name}: --shape {p.name}=... (a tensor) or --value {p.name}=...")
    if isinstance(f, nn.Module):
        f = f.to(dtype)
    try:
        traced = trace_map(f, example[0], example[1:], name=args.name)
    except UntraceableError as exc:
        why = _without_fx_traceback(str(exc), args.target.rpartition(":")[0])
        print(printable(f"fpidsl: error: cannot trace {args.target}: {why}"), file=sys.stderr)
        return EXIT_SPEC_ERROR
    shown = " ".join(f"{k}={','.join(map(str, v))}" for k, v in shapes.items())
    text = traced.spec.text.replace("# Traced from a PyTorch map by fpidsl.trace",
                                    f"# Traced from {args.target} ({shown}) by fpidsl trace", 1)
    _converted_output(text, args.output, args.target.rpartition(":")[0])  # a spec, written like fmt --to's
    return EXIT_OK
