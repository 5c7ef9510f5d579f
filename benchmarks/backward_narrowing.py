"""The emitted backward map with and without the narrowing of scattered products (issue 12): BibtexGD's
``vjp_state`` multiplied a [B, 1995] scatter of the cotangent by fc1's [1995, 512] weight every backward iteration
where the [B, 159] cotangent times the weight's first 159 rows is the same number.

    python benchmarks/backward_narrowing.py [--batch 256] [--repeats 30]

Prints the time of one ``vjp_state`` call (the backward solver's iteration) and of one ``vjp_args`` call, both
forms compiled in this process from specs/bibtex.fpi, and checks that they agree.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import median_time  # noqa: E402

from fpidsl.loader import module_from_source  # noqa: E402
from fpidsl.compiler import check_file  # noqa: E402
from fpidsl.codegen.emit import emit_module  # noqa: E402
from fpidsl.passes import narrow  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "specs" / "bibtex.fpi"


def compiled(narrowed: bool):
    checked = check_file(str(SPEC))
    if narrowed:
        code = emit_module(checked)
    else:
        with mock.patch.object(narrow, "narrow_scattered_products", lambda bg, linear: bg):
            code = emit_module(checked)
    module = module_from_source(code, f"<bibtex narrowed={narrowed}>", f"bibtex_bench_{int(narrowed)}")
    return module.LAYERS["BibtexGD"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cases = {}
    for narrowed in (False, True):
        cls = compiled(narrowed)
        torch.manual_seed(0)
        layer = cls()
        x = torch.randn(args.batch, 1836)
        y = torch.randn(args.batch, 159)
        params = tuple(p.detach() for p in layer.parameter_tensors())
        saved = cls.adjoint.prepare((y,), (x, *params))
        cases[narrowed] = (cls.adjoint, saved, (torch.randn(args.batch, 159),))
    times = {(n, part): [] for n in cases for part in ("state", "args")}
    with torch.no_grad():
        for adjoint, saved, c in cases.values():  # warm-up
            adjoint.vjp_state(saved, c), adjoint.vjp_args(saved, c)
        for _ in range(args.repeats):  # the two forms alternate, run by run
            for narrowed, (adjoint, saved, c) in cases.items():
                times[narrowed, "state"].append(median_time(lambda: adjoint.vjp_state(saved, c), 1, 5))
                times[narrowed, "args"].append(median_time(lambda: adjoint.vjp_args(saved, c), 1, 1))
        results = {n: (a.vjp_state(s, c), a.vjp_args(s, c)) for n, (a, s, c) in cases.items()}
    rows = [("narrowed" if n else "before", statistics.median(times[n, "state"]), statistics.median(times[n, "args"]))
            for n in (False, True)]
    print(f"BibtexGD backward map, batch {args.batch}, float32, 1 thread (median of {args.repeats} alternating runs)")
    print(f"{'form':>10} {'vjp_state ms':>13} {'vjp_args ms':>12}")
    for name, s, p in rows:
        print(f"{name:>10} {s * 1e3:13.2f} {p * 1e3:12.2f}")
    print(f"vjp_state: {rows[0][1] / rows[1][1]:.2f}x faster")
    (a_state, a_args), (b_state, b_args) = results[False], results[True]
    for u, v in zip((*a_state, *a_args), (*b_state, *b_args)):
        if u is not None:
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    print("both forms agree (rtol 1e-4)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
