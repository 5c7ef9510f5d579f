"""The emitted backward map with and without the narrowing of scattered products (issue 12): BibtexGD's
``vjp_state`` multiplied a [B, 1995] scatter of the cotangent by fc1's [1995, 512] weight every backward iteration
where the [B, 159] cotangent times the weight's first 159 rows is the same number.

    python benchmarks/backward_narrowing.py [--batch 256] [--repeats 30]

Prints the time of one ``vjp_state`` call (the backward solver's iteration) and of one ``vjp_args`` call, both
forms compiled in this process from specs/bibtex.fpi, and checks that they agree.
"""
from __future__ import annotations

import argparse
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
    rows = []
    results = {}
    for narrowed in (False, True):
        cls = compiled(narrowed)
        torch.manual_seed(0)
        layer = cls()
        x = torch.randn(args.batch, 1836)
        y = torch.randn(args.batch, 159)
        params = tuple(p.detach() for p in layer.parameter_tensors())
        saved = cls.adjoint.prepare((y,), (x, *params))
        c = (torch.randn(args.batch, 159),)
        with torch.no_grad():
            state = median_time(lambda: cls.adjoint.vjp_state(saved, c), args.repeats, 5)
            params_t = median_time(lambda: cls.adjoint.vjp_args(saved, c), args.repeats, 1)
            results[narrowed] = (cls.adjoint.vjp_state(saved, c), cls.adjoint.vjp_args(saved, c))
        rows.append(("narrowed" if narrowed else "before", state, params_t))
    print(f"BibtexGD backward map, batch {args.batch}, float32, 1 thread (median of {args.repeats})")
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
