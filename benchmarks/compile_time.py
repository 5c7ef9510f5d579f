"""Compile time against spec size: generated chains of lets and deeply nested expressions, checked, lowered and
printed (``fpidsl compile``'s work), with the growth ratio per doubling.

    python benchmarks/compile_time.py            # lets 100..3200, nesting 125..1000 (and 5000 with --deep)
    python benchmarks/compile_time.py --quick    # small sizes (the smoke test)
    python benchmarks/compile_time.py --with-gc  # the same with the garbage collector left running
    python benchmarks/compile_time.py --megabyte # check a 1 MB spec: time and peak memory
    python benchmarks/compile_time.py --limits   # the 5000-sized cases of docs/LIMITS.md

Targets (issue 12): 1600 lets in under 5 s on the 2-core CI machine; each doubling at most 2.3x the time. Wall
and CPU seconds are both printed: on a shared machine the wall time also counts the waits for a core.
"""
from __future__ import annotations

import argparse
import os
import statistics
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


def seconds(text: str) -> tuple[float, float]:
    """One compile: (wall seconds, CPU seconds of this process; the compiler runs in its own thread)."""
    wall, cpu = time.perf_counter(), time.process_time()
    compile_source(Source("generated.fpi", text))
    return time.perf_counter() - wall, time.process_time() - cpu


def table(title: str, make, sizes, rounds: int = 1, budget: float = 0.0) -> dict[int, tuple[float, float]]:
    """Each size compiled once per round, the rounds interleaved (every size, then every size again, in the
    opposite order: a change in the machine's load falls on all sizes alike), then small sizes again until each
    has had ``budget`` seconds (they compile in a tenth of a second, where a shared machine's noise is as large as
    the doubling being measured). Per size, the best wall and the best CPU seconds and the median CPU seconds,
    and their growth per step (the best of more runs is lower: the median does not favour the small sizes that
    ran more often)."""
    texts = {n: make(n) for n in sizes}
    samples: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
    for r in range(rounds):
        for n in (sizes if r % 2 == 0 else sizes[::-1]):
            samples[n].append(seconds(texts[n]))
    for n in sizes:
        while sum(w for w, _ in samples[n]) + min(w for w, _ in samples[n]) <= budget:
            samples[n].append(seconds(texts[n]))
    print(f"\n{title} ({rounds} interleaved rounds, small sizes repeated up to {budget:g} s; the best run and the "
          f"median CPU run of each)\n{'size':>8} {'wall s':>8} {'x prev':>7} {'CPU s':>8} {'x prev':>7} "
          f"{'median':>8} {'x prev':>7} {'runs':>5}")
    best, prev = {}, None
    for n in sizes:
        wall, cpu = min(w for w, _ in samples[n]), min(c for _, c in samples[n])
        median = statistics.median(c for _, c in samples[n])
        ratios = [f"{a / b:7.2f}" for a, b in zip((wall, cpu, median), prev)] if prev else ["", "", ""]
        print(f"{n:>8} {wall:8.3f} {ratios[0]:>7} {cpu:8.3f} {ratios[1]:>7} {median:8.3f} {ratios[2]:>7} "
              f"{len(samples[n]):>5}", flush=True)
        best[n] = (wall, cpu)
        prev = (wall, cpu, median)
    return best


def megabyte() -> int:
    import resource

    from fpidsl.compiler import check_source

    text = chain_of_lets(24000)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    check_source(Source("megabyte.fpi", text))
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"a spec of {len(text.encode()):,} bytes (24,000 chained lets): checked in {took:.1f} s wall, "
          f"{cpu:.1f} s CPU, peak resident memory {after.ru_maxrss / 1024:.0f} MB")
    return 0


def _limit_specs() -> dict[str, str]:
    """The 5000-sized cases of docs/LIMITS.md."""
    head = "layer L {\n  input a : [B, 4]\n  state x : [B, 4] = zeros\n"
    lets = "\n".join(f"  let l{i + 1} = 0.5 * l{i}" for i in range(5000))
    fns = "\n".join(f"fn f{i + 1}(v) = 0.9 * f{i}(v)" for i in range(5000))
    return {
        "0.5 * tanh(tanh(... 5000 ...(x)...)) + a":
            head + "  update x = 0.5 * " + "tanh(" * 5000 + "x" + ")" * 5000 + " + a\n}\n",
        "5000 chained lets `let l{i+1} = 0.5 * l{i}`": head + "  let l0 = x\n" + lets + "\n  update x = l5000 + a\n}\n",
        "5000 chained fns `fn f{i+1}(v) = 0.9 * f{i}(v)`":
            "fn f0(v) = v\n" + fns + "\n" + head + "  update x = 0.5 * f5000(x) + a\n}\n",
        "a 5000-term sum": head + "  update x = 0.0001 * (" + " + ".join(["x"] * 5000) + ") + a\n}\n",
    }


def limits() -> int:
    """CPU seconds (resource.getrusage) to check, to check and compile, and to load each 5000-sized case."""
    import resource

    from fpidsl.compiler import check_source
    from fpidsl.loader import load_source

    def cpu(run) -> float:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        run()
        return resource.getrusage(resource.RUSAGE_SELF).ru_utime - before

    print(f"{'spec':<52} {'check':>7} {'compile':>8} {'load':>6}   (CPU seconds; compile = check + lower + print,"
          " load = fpidsl.load's compile + exec)")
    for name, text in _limit_specs().items():
        check = cpu(lambda: check_source(Source("limits.fpi", text)))
        both = cpu(lambda: compile_source(Source("limits.fpi", text)))
        load = cpu(lambda: load_source(Source(f"limits_{len(name)}.fpi", text)))
        print(f"{name:<52} {check:7.1f} {both:8.1f} {load:6.1f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--deep", action="store_true", help="also nest 5000 deep")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved rounds (compiles per size at least); the best is reported")
    ap.add_argument("--with-gc", action="store_true",
                    help="leave Python's cyclic garbage collector running during compiles (what the compiler did "
                         "before it paused it: fpidsl.compiler.paused_gc)")
    ap.add_argument("--megabyte", action="store_true",
                    help="only: check a spec of about 1 MB (24,000 chained lets); print its time and peak memory")
    ap.add_argument("--limits", action="store_true", help="only: the 5000-sized cases of docs/LIMITS.md")
    args = ap.parse_args(argv)
    if args.limits:
        return limits()
    if args.with_gc:
        import contextlib

        from fpidsl import compiler

        compiler.paused_gc = contextlib.nullcontext
    if args.megabyte:
        return megabyte()
    seconds(chain_of_lets(2))  # warm-up: imports and the parser's tables
    lets = [25, 50, 100] if args.quick else [100, 200, 400, 800, 1600, 3200]
    depths = [25, 50] if args.quick else [125, 250, 500, 1000] + ([5000] if args.deep else [])
    rounds, budget = (1, 0.0) if args.quick else (args.repeats, 3.0)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    table("chain of lets", chain_of_lets, lets, rounds, budget)
    table("nested calls", nested, depths, rounds, budget)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
