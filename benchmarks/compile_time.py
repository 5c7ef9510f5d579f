"""Compile time against spec size: generated chains of lets and deeply nested expressions, checked, lowered and
printed (``fpidsl compile``'s work), with the growth ratio per doubling.

    python benchmarks/compile_time.py            # lets 100..3200, nesting 125..1000 (and 5000 with --deep)
    python benchmarks/compile_time.py --quick    # small sizes (the smoke test)

Targets (issue 12): 1600 lets in under 5 s on the 2-core CI machine; each doubling at most 2.3x the time.
"""
from __future__ import annotations

import argparse
import time

from fpidsl.compiler import compile_source
from fpidsl.source import Source

HEAD = "layer Chain {\n  input a : [B, 8]\n  state x : [B, 8] = zeros\n  param W : tensor [8, 8] = normal(0, 0.1)\n"


def chain_of_lets(n: int) -> str:
    lines = ["  let h0 = tanh(x @ W + a)"]
    lines += [f"  let h{i} = tanh(0.5 * h{i - 1} + 0.1 * a)" for i in range(1, n)]
    return HEAD + "\n".join(lines) + f"\n  update x = 0.5 * h{n - 1}\n}}\n"


def nested(depth: int) -> str:
    expr = "x"
    for _ in range(depth):
        expr = f"tanh({expr})"
    return HEAD + f"  update x = 0.5 * {expr} @ W + a\n}}\n"


def seconds(text: str, repeats: int = 1, budget: float = 3.0) -> float:
    """The best of ``repeats`` compiles, or of as many as fit in ``budget`` seconds when that is more (small specs
    compile in a tenth of a second, where a busy machine's noise is as large as the doubling being measured)."""
    best, spent, done = float("inf"), 0.0, 0
    while done < repeats or spent + best <= budget:
        start = time.perf_counter()
        compile_source(Source("generated.fpi", text))
        took = time.perf_counter() - start
        best, spent, done = min(best, took), spent + took, done + 1
    return best


def table(title: str, make, sizes, repeats: int = 1, budget: float = 0.0) -> list[tuple[int, float]]:
    print(f"\n{title} (best of at least {repeats}, and of as many as fit in {budget:g} s)\n"
          f"{'size':>8} {'seconds':>9} {'x prev':>7}")
    rows, prev = [], None
    for n in sizes:
        t = seconds(make(n), repeats, budget)
        ratio = f"{t / prev:7.2f}" if prev else "       "
        print(f"{n:>8} {t:9.3f} {ratio}", flush=True)
        rows.append((n, t))
        prev = t
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--deep", action="store_true", help="also nest 5000 deep")
    ap.add_argument("--repeats", type=int, default=3, help="compiles per size; the best is reported")
    args = ap.parse_args(argv)
    seconds(chain_of_lets(2))  # warm-up: imports and the parser's tables
    lets = [25, 50, 100] if args.quick else [100, 200, 400, 800, 1600, 3200]
    depths = [25, 50] if args.quick else [125, 250, 500, 1000] + ([5000] if args.deep else [])
    repeats, budget = (1, 0.0) if args.quick else (args.repeats, 3.0)
    table("chain of lets", chain_of_lets, lets, repeats, budget)
    table("nested calls", nested, depths, repeats, budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
