"""Run every benchmark of fpidsl and write the tables to docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/run.py                      # the full run (about 7 minutes on one loaded core)
    .venv/bin/python benchmarks/run.py --quick --out /tmp/b.md   # tiny sizes, a few repeats (seconds)
    .venv/bin/python benchmarks/run.py --device cuda        # the same tables on a GPU (docs/BENCHMARKS_GPU.md)

Every comparison runs in this one process, float32, CPU (or ``--device cuda``), one intra-op thread, on the same g,
the same weights, the same inputs, the same start (zeros) and the same tolerance and criterion (absolute:
``|g(x) - x|`` per sample). The contenders of a comparison alternate run by run (the order rotates every round)
after one warm-up run each, and the tables report medians. A training step is: solve, loss, ``loss.backward()``
(all parameter gradients). On a GPU every timed run ends with ``torch.cuda.synchronize()``.

1. fpidsl (the compiled spec) against torchdeq 0.1.0 with its exact implicit backward (``ift=True``), Picard
   (``fixed_point_iter``) and Anderson; both must reach the tolerances and their gradients must agree;
2. fpidsl against unrolled autograd through the same number of Picard iterations (time; peak memory in 5.);
3. the cost floor: forward steps x one evaluation of g + backward steps x one vector-Jacobian product (autograd,
   recorded once), each measured on its own; fpidsl's step as a ratio of it;
4. the compiled spec against the same map written by hand and passed to ``fpidsl.runtime.fixed_point``;
5. peak tensor memory of a training step at 20 and at 400 forced iterations (fpidsl and unrolled);
6. the solver's own overhead per iteration, on a tiny map;
7. ``compile=True`` of a compiled layer (torch.compile of step and backward map) on one workload.

The document's text after the line ``<!-- notes -->`` (analysis written by hand) is kept when it is rewritten.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from workloads import Workload, make_workloads  # noqa: E402

from fpidsl.runtime import BACKWARD_DEFAULTS, FORWARD_DEFAULTS, fixed_point  # noqa: E402

NOTES_MARKER = "<!-- notes -->"
MiB = 2**20
TARGET_TORCHDEQ = 0.8
TARGET_FLOOR = 1.2
TARGET_HAND = 1.05
TARGET_MEMORY = 0.10

Step = Callable[[], None]
DEVICE = torch.device("cpu")  # set by --device: where every workload and contender runs


def _wait() -> None:
    """Wait for the device to finish its queue (a GPU runs asynchronously: a step's time ends when its work does)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# ---------------------------------------------------------------------------------------------- timing


def alternate(contenders: dict[str, Step], repeats: int) -> dict[str, float]:
    """Median seconds of each contender; one warm-up run each, then ``repeats`` rounds, the order rotating."""
    return {name: statistics.median(t) for name, t in alternate_runs(contenders, repeats).items()}


def round_ratio(runs: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of ``a``'s time over ``b``'s in the same round: on a loaded machine the load moves
    between rounds more than within one, so this ratio is steadier than the ratio of the medians."""
    return statistics.median(x / y for x, y in zip(runs[a], runs[b]))


def alternate_runs(contenders: dict[str, Step], repeats: int) -> dict[str, list[float]]:
    """Seconds of every timed run of each contender, round by round (see :func:`alternate`)."""
    names = list(contenders)
    for name in names:
        contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            _wait()
            start = time.perf_counter()
            contenders[name]()
            _wait()
            times[name].append(time.perf_counter() - start)
    return times


def median_time(fn: Step, repeats: int, inner: int = 1) -> float:
    fn()
    return statistics.median(_timed(fn, inner) for _ in range(repeats))


def _timed(fn: Step, inner: int) -> float:
    """Seconds of one call of ``fn`` (the mean of ``inner`` back to back)."""
    _wait()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _wait()
    return (time.perf_counter() - start) / inner


# ---------------------------------------------------------------------------------------------- memory


def peak_bytes(run: Step) -> int:
    """Peak tensor bytes allocated by ``run`` above what was allocated when it started (benchmarks/memory.py)."""
    from memory import peak_bytes_cpu, peak_bytes_cuda

    return (peak_bytes_cuda if DEVICE.type == "cuda" else peak_bytes_cpu)(run)


# ---------------------------------------------------------------------------------------------- contenders


@dataclass
class Outcome:
    """What a contender's last step left: gradients and whether the solves reached their tolerances."""

    grads: list[torch.Tensor] = field(default_factory=list)
    forward_ok: bool = True
    backward_ok: bool = True
    forward_iters: int = 0
    backward_iters: int = 0


def _grads(params) -> list[torch.Tensor]:
    """The step's gradients, kept by reference: every step starts by setting ``p.grad = None``, so these tensors are
    never written again (a copy would add megabytes of traffic to every timed step)."""
    return [p.grad.detach() for p in params]


def _zero(params) -> None:
    for p in params:
        p.grad = None


def fpidsl_step(w: Workload, method: str, out: Outcome, iterations: int | None = None) -> Step:
    """fpidsl's training step on the workload's compiled layer with ``method``'s settings, set on the layer at each
    call (steps of one workload with different methods may alternate). The settings are the spec's with the
    method's on top, never the layer's current ones: those are the last step's, whose method's options (an
    Anderson ``m = 6``) would otherwise carry over to the next method (a Broyden memory of 6, not its 50)."""
    layer = w.layer
    forward, backward = w.settings(method, iterations)
    solve_settings = FORWARD_DEFAULTS.merged(type(layer).SOLVE).merged(forward)
    backward_settings = BACKWARD_DEFAULTS.merged(type(layer).BACKWARD).merged(backward)
    params = w.params

    def step() -> None:
        if layer.solve_settings is not solve_settings or layer.backward_settings is not backward_settings:
            layer.solve_settings, layer.backward_settings = solve_settings, backward_settings  # another method's
        _zero(params)
        w.loss(layer(w.z), w.target).backward()
        stats = layer.stats
        out.grads = _grads(params)
        _record(out, stats)

    return step


def _record(out: Outcome, stats) -> None:
    """Whether both solves converged, and the most iterations any sample took."""
    out.forward_ok = bool(stats.forward.converged.all())
    out.backward_ok = bool(stats.backward.converged.all())
    out.forward_iters = int(stats.forward.iterations.max())
    out.backward_iters = int(stats.backward.iterations.max())


def hand_step(w: Workload, method: str, out: Outcome) -> Step:
    forward, backward = w.settings(method)
    params = w.params
    batched = (True,) + (False,) * len(params)

    def step() -> None:
        _zero(params)
        x_hat, stats = fixed_point(w.hand, w.x0(), w.z, *params, backward=backward, batched=batched,
                                   return_stats=True, **forward)
        w.loss(w.output(x_hat), w.target).backward()
        out.grads = _grads(params)
        _record(out, stats)

    return step


def torchdeq_step(w: Workload, method: str, out: Outcome, emitted: bool = False) -> Step:
    """torchdeq's training step on the hand-written map, or (``emitted``) on the compiled layer's ``step``: the
    same kernels fpidsl's code calls, to tell the solvers apart from the kernels."""
    from torchdeq import get_deq

    solver = {"picard": "fixed_point_iter", "anderson": "anderson"}[method]
    deq = get_deq(core="indexing", ift=True, f_solver=solver, b_solver=solver, f_max_iter=w.max_iter,
                  b_max_iter=w.max_iter, f_tol=w.tol, b_tol=w.b_tol, f_stop_mode="abs", b_stop_mode="abs")
    deq.train()
    params = w.params
    backward_info: dict = {}

    def writer(info) -> None:
        backward_info.update(info)

    def step() -> None:
        _zero(params)
        g = type(w.layer).step if emitted else w.hand
        z_out, info = deq(lambda x: g(x, w.z, *params), w.x0(), backward_writer=writer)
        w.loss(w.output(z_out[-1]), w.target).backward()
        out.grads = _grads(params)
        out.forward_ok = bool(info["abs_lowest"].max() < w.tol)
        out.backward_ok = bool(backward_info["abs_lowest"].max() < w.b_tol)
        out.forward_iters = int(info["nstep"].max())
        out.backward_iters = int(backward_info["nstep"].max())

    return step


def unrolled_step(w: Workload, iterations: int, out: Outcome) -> Step:
    params = w.params

    def step() -> None:
        _zero(params)
        x = w.x0()
        for _ in range(iterations):
            x = w.hand(x, w.z, *params)
        w.loss(w.output(x), w.target).backward()
        out.grads = _grads(params)
        out.forward_iters = out.backward_iters = iterations

    return step


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = math.sqrt(sum(float((x - y).square().sum()) for x, y in zip(a, b)))
    den = math.sqrt(sum(float(y.square().sum()) for y in b))
    return num / den


# ---------------------------------------------------------------------------------------------- the cost floor


def _near_fixed_point(w: Workload, params) -> torch.Tensor:
    with torch.no_grad():
        x = w.hand(w.x0(), w.z, *params)
        for _ in range(20):
            x = w.hand(x, w.z, *params)
    return x


def floor_part_fns(w: Workload) -> tuple[tuple[Step, ...], int]:
    """The floor's parts as calls, and how many of each make one timed run: one evaluation of g and one VJP
    ``(dg/dx)^T c``, near the fixed point, as fpidsl runs them (the forward iteration on hoisted values, the emitted
    ``vjp_state``); the work done once per training step whatever the number of iterations (``hoist``,
    ``adjoint.prepare``, ``adjoint.vjp_args``); and g and its VJP as written by hand (g without autograd; the VJP by
    autograd over a graph recorded once)."""
    params = tuple(p.detach() for p in w.params)
    x = _near_fixed_point(w, params)
    inner = 20 if x.numel() < 100_000 else 3
    cls, args = type(w.layer), (w.z, *params)
    c = torch.randn_like(x)

    with torch.no_grad():
        hoisted = cls.hoist(*args) if cls.HOIST_BATCHED is not None else None
        saved = cls.adjoint.prepare((x,), args)

    def evaluate_emitted() -> None:
        with torch.no_grad():
            cls.iterate(x, *hoisted) if hoisted is not None else cls.step(x, *args)

    def vjp_emitted() -> None:
        with torch.no_grad():
            cls.adjoint.vjp_state(saved, (c,))

    def once() -> None:
        with torch.no_grad():
            if hoisted is not None:
                cls.hoist(*args)
            cls.adjoint.vjp_args(cls.adjoint.prepare((x,), args), (c,))

    def evaluate_hand() -> None:
        with torch.no_grad():
            w.hand(x, w.z, *params)

    xs = x.detach().requires_grad_()
    y = w.hand(xs, w.z, *params)

    def vjp_hand() -> None:
        torch.autograd.grad(y, xs, c, retain_graph=True)

    return (evaluate_emitted, vjp_emitted, once, evaluate_hand, vjp_hand), inner


class FloorTimes(NamedTuple):
    """Seconds (medians over rounds) of the floor's parts, the floor and fpidsl's step, and the ratio of the step
    to the floor (the median over rounds of the step over that round's floor)."""

    g: float
    vjp: float
    once: float
    hand_g: float
    hand_vjp: float
    floor: float
    alone: float
    ratio: float
    ratio_range: tuple[float, float]  # the lowest and highest round's ratio


def floor_times(w: Workload, step: Step, out: Outcome, repeats: int) -> FloorTimes:
    """:class:`FloorTimes` for fpidsl's ``step`` (already run once: ``out`` holds its iteration counts). Each round
    times the step once and then each part (``inner`` calls back to back), so that a change of the machine's speed
    between rounds (seen here: 30% within a minute) moves the step and its floor together."""
    fns, inner = floor_part_fns(w)
    for fn in (step, *fns):
        fn()
    steps: list[float] = []
    parts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        steps.append(_timed(step, 1))
        for samples, fn in zip(parts, fns):
            samples.append(_timed(fn, inner))
    floors = [_floor(out, *round_parts) for round_parts in zip(*parts[:3])]
    medians = [statistics.median(p) for p in parts]
    ratios = [s / f for s, f in zip(steps, floors)]
    return FloorTimes(*medians, _floor(out, *medians[:3]), statistics.median(steps), statistics.median(ratios),
                      (min(ratios), max(ratios)))


def _floor(out: Outcome, g: float, vjp: float, once: float) -> float:
    """The floor of a step with ``out``'s iteration counts: forward steps x g + backward steps x VJP + once."""
    return out.forward_iters * g + out.backward_iters * vjp + once


def floor_row(w: Workload, method: str, step: Step, out: Outcome, repeats: int,
              times: FloorTimes | None = None) -> list[str]:
    """Table 3's row: the floor's parts, the floor, the step, the ratio and the target; the hand-written g / VJP
    last (``times``: :func:`floor_times`, measured now if None)."""
    t = times or floor_times(w, step, out, repeats)
    return [w.name, method, f"{out.forward_iters} x {ms(t.g)}", f"{out.backward_iters} x {ms(t.vjp)}",
            ms(t.once), ms(t.floor), ms(t.alone), f"{t.ratio:.2f}",
            "met" if t.ratio <= TARGET_FLOOR else "**not met**", f"{ms(t.hand_g)} / {ms(t.hand_vjp)}"]


# ---------------------------------------------------------------------------------------------- per-iteration overhead


OVERHEAD_SHAPES = ((4, 8), (8, 1, 64, 64))  # tiny; the conv workloads' state


def cheap(x, z):
    """The cheap map of the per-iteration tables: one evaluation costs next to nothing beside the solver's work."""
    return 0.5 * x + z


def forced_solve(z: torch.Tensor, iterations: int, **settings) -> Step:
    """A ``fixed_point`` solve of :func:`cheap` forced to exactly ``iterations`` iterations."""
    forced = {"min_iter": iterations, "max_iter": iterations, "on_fail": "ignore", **settings}

    def solve() -> None:
        fixed_point(cheap, torch.zeros_like(z), z, **forced)
    return solve


def bare_loop(z: torch.Tensor, iterations: int) -> Step:
    """The same iterations of :func:`cheap` as a bare loop (no solver, no judgement)."""
    def bare() -> None:
        with torch.no_grad():
            x = torch.zeros_like(z)
            for _ in range(iterations):
                x = cheap(x, z)
    return bare


def overhead_rows(repeats: int, iterations: int) -> list[tuple[str, str, float, float]]:
    """Seconds per iteration of a forced-length solve of the cheap map ``0.5 x + z``, against the bare loop of the
    same map, for a tiny state and for the conv workloads' state (where the solver's own tensor work shows)."""
    torch.manual_seed(0)
    rows = []
    for shape in OVERHEAD_SHAPES:
        z = torch.randn(*shape, device=DEVICE)
        for method in ("picard", "anderson"):
            t_solve = median_time(forced_solve(z, iterations, method=method), repeats) / iterations
            t_bare = median_time(bare_loop(z, iterations), repeats) / iterations
            rows.append(("x".join(map(str, shape)), method, t_solve, t_bare))
    return rows


# ---------------------------------------------------------------------------------------------- compile=True


def compile_rows(w: Workload, method: str, repeats: int) -> list[tuple]:
    """(variant, first call seconds, median seconds, forward iterations) for compile=False and compile=True."""
    eager_layer = w.layer
    compiled_layer = type(eager_layer)(compile=True).to(DEVICE)
    compiled_layer.load_state_dict(eager_layer.state_dict())
    compiled = Workload(**{**w.__dict__, "layer": compiled_layer})
    outs = {"eager": Outcome(), "compile=True": Outcome()}
    steps = {"eager": fpidsl_step(w, method, outs["eager"]),
             "compile=True": fpidsl_step(compiled, method, outs["compile=True"])}
    first = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
    medians = alternate(steps, repeats)
    err = relative_error(outs["compile=True"].grads, outs["eager"].grads)
    return [(name, first[name], medians[name], outs[name].forward_iters, err) for name in steps]


# ---------------------------------------------------------------------------------------------- the report


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def ok(flag: bool) -> str:
    return "yes" if flag else "**NO**"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``): otherwise every large temporary is mapped and
    zeroed anew, and timings of 64x64 convolutions varied fourfold from run to run. The same for every
    contender. False where the C library has no ``mallopt``."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 2**30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def run(args: argparse.Namespace) -> str:
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    args.steady_allocator = steady_allocator()
    warnings.simplefilter("ignore")
    repeats = args.repeats or (3 if args.quick else 5)
    workloads = [w.to(DEVICE) for w in make_workloads(args.quick)]
    say = (lambda *a: print(*a, file=sys.stderr, flush=True))
    load_before = os.getloadavg()

    speed_rows, grad_rows, floor_rows, hand_rows, unrolled_rows, mem_rows = [], [], [], [], [], []
    for w in workloads:
        for method in ("picard", "anderson"):
            say(f"timing {w.name} {method}")
            outs = {name: Outcome() for name in ("fpidsl", "hand", "torchdeq", "torchdeq-emitted", "unrolled")}
            contenders = {
                "fpidsl": fpidsl_step(w, method, outs["fpidsl"]),
                "hand": hand_step(w, method, outs["hand"]),
                "torchdeq": torchdeq_step(w, method, outs["torchdeq"]),
                "torchdeq-emitted": torchdeq_step(w, method, outs["torchdeq-emitted"], emitted=True),
            }
            contenders["fpidsl"]()  # the iteration count the unrolled baseline runs
            if method == "picard":
                contenders["unrolled"] = unrolled_step(w, outs["fpidsl"].forward_iters, outs["unrolled"])
            t = alternate(contenders, repeats)
            f, d, h = outs["fpidsl"], outs["torchdeq"], outs["hand"]
            speed_rows.append([w.name, method, ms(t["fpidsl"]), ms(t["torchdeq"]),
                               f"{t['fpidsl'] / t['torchdeq']:.2f}",
                               "met" if t["fpidsl"] / t["torchdeq"] <= TARGET_TORCHDEQ else "**not met**",
                               ms(t["torchdeq-emitted"]), f"{t['fpidsl'] / t['torchdeq-emitted']:.2f}"])
            grad_rows.append([w.name, method, f"{f.forward_iters} / {f.backward_iters}",
                              f"{d.forward_iters} / {d.backward_iters}",
                              f"{ok(f.forward_ok)} / {ok(f.backward_ok)}", f"{ok(d.forward_ok)} / {ok(d.backward_ok)}",
                              f"{relative_error(d.grads, f.grads):.1e}", f"{relative_error(h.grads, f.grads):.1e}"])
            hand_rows.append([w.name, method, ms(t["fpidsl"]), ms(t["hand"]), f"{t['fpidsl'] / t['hand']:.2f}",
                              "met" if t["fpidsl"] / t["hand"] <= TARGET_HAND else "**not met**"])
            row = floor_row(w, method, contenders["fpidsl"], f, repeats)
            floor_rows.append(row[:-1] + [ms(t["fpidsl"]), row[-1]])
            if method == "picard":
                u = outs["unrolled"]
                unrolled_rows.append([w.name, str(u.forward_iters), ms(t["fpidsl"]), ms(t["unrolled"]),
                                      f"{t['fpidsl'] / t['unrolled']:.2f}", f"{relative_error(u.grads, f.grads):.1e}"])
        say(f"memory {w.name}")
        mem_rows.append(memory_row(w, args.iterations))

    say("solver overhead")
    over = overhead_rows(repeats, 50 if args.quick else 300)
    comp = None
    if not args.no_compile:
        w = workloads[0]
        say(f"compile=True on {w.name}")
        comp = (w, compile_rows(w, "picard", repeats))
    load_after = os.getloadavg()

    return report(args, repeats, workloads, load_before, load_after, speed_rows, grad_rows, floor_rows, hand_rows,
                  unrolled_rows, mem_rows, over, comp)


def memory_row(w: Workload, counts: tuple[int, int]) -> list[str]:
    peaks = {}
    for n in counts:
        out = Outcome()
        for kind, make in (("fpidsl", lambda: fpidsl_step(w, "picard", out, iterations=n)),
                           ("unrolled", lambda: unrolled_step(w, n, out))):
            step = make()
            step()  # warm-up
            out.grads = []  # the step starts with no gradients and no earlier outcome alive: the same every time
            _zero(w.params)
            peaks[kind, n] = peak_bytes(step)
            if kind == "fpidsl":
                assert out.forward_iters == n and out.backward_iters == n, (out.forward_iters, out.backward_iters)
    few, many = counts
    change = (peaks["fpidsl", many] - peaks["fpidsl", few]) / peaks["fpidsl", few]
    return [w.name, f"{peaks['fpidsl', few] / MiB:.1f}", f"{peaks['fpidsl', many] / MiB:.1f}", f"{change:+.1%}",
            "met" if abs(change) <= TARGET_MEMORY else "**not met**",
            f"{peaks['unrolled', few] / MiB:.1f}", f"{peaks['unrolled', many] / MiB:.1f}"]


def report(args, repeats, workloads, load_before, load_after, speed_rows, grad_rows, floor_rows, hand_rows,
           unrolled_rows, mem_rows, over, comp) -> str:
    few, many = args.iterations
    command = "python benchmarks/run.py" + (" " + " ".join(args.argv) if args.argv else "")
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    import torchdeq

    parts = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/run.py` (do not edit above the notes marker; rerun it). "
        "Every number is the median of the runs of one process that alternates the contenders run by run.",
        "",
        f"- command: `{command}`" + (" (quick mode: tiny sizes, not representative)" if args.quick else ""),
        f"- machine: {cpu}, {os.cpu_count()} cores, shared with other jobs; load average (1, 5, 15 min) "
        f"{'/'.join(f'{x:.2f}' for x in load_before)} at the start, "
        f"{'/'.join(f'{x:.2f}' for x in load_after)} at the end",
        f"- torch {torch.__version__}, torchdeq {getattr(torchdeq, '__version__', '0.1.0')}, "
        f"Python {platform.python_version()}, float32, {device_name()}, `torch.set_num_threads(1)`",
        f"- {repeats} timed runs per contender after one warm-up run; a training step = forward solve, loss, "
        f"`loss.backward()`",
        "- allocator: " + ("glibc `mallopt` keeps freed memory in the process (mmap threshold 1 GiB, no trimming), "
                           "so large temporaries are reused rather than mapped and zeroed anew on every call"
                           if args.steady_allocator else "the C library's defaults (no `mallopt`)"),
        "- same g, weights, inputs, start (zeros), tolerances and criterion (absolute, `|g(x) - x|` per sample, "
        "torchdeq `stop_mode='abs'`) for every contender; Anderson: m = 6, lam = 1e-4, beta (tau) = 1 on both sides",
        "",
        "Workloads:",
        "",
    ]
    parts += [f"- `{w.name}`: {w.description}; forward tol {w.tol:g}, backward tol {w.b_tol:g}" for w in workloads]
    parts += [
        "",
        f"## 1. fpidsl against torchdeq (`ift=True`), training step (target: at most {TARGET_TORCHDEQ}x)",
        "",
        table(["workload", "method", "fpidsl ms", "torchdeq ms", "ratio", "target", "torchdeq on fpidsl's step ms",
               "ratio to it"], speed_rows),
        "",
        "The last two columns run torchdeq on the compiled layer's `step` (the kernels fpidsl's code calls, "
        "without the hoisting of the forward iteration) instead of the hand-written map: the difference between "
        "the two torchdeq columns is the compiler's kernel choice, the remaining ratio is the solvers', the "
        "backward map's and the hoisting's.",
        "",
        "Both reach the tolerances, and their gradients agree (iterations: the most any sample took, forward / "
        "backward; torchdeq's backward starts from 0, fpidsl's from the incoming gradient, one step ahead):",
        "",
        table(["workload", "method", "fpidsl iters", "torchdeq iters", "fpidsl tol reached", "torchdeq tol reached",
               "grad rel. diff torchdeq", "grad rel. diff hand"], grad_rows),
        "",
        "## 2. fpidsl against unrolled autograd through the same Picard iterations",
        "",
        table(["workload", "iterations", "fpidsl ms", "unrolled ms", "ratio", "grad rel. diff"], unrolled_rows),
        "",
        f"## 3. The cost floor (target: at most {TARGET_FLOOR}x)",
        "",
        "floor = forward steps x one evaluation of g + backward steps x one VJP + the work done once a step, each "
        "measured alone on the whole batch near the fixed point, as fpidsl's code computes them: the forward "
        "iteration on its hoisted values, the emitted `vjp_state`, and once `hoist`, `adjoint.prepare` and "
        "`adjoint.vjp_args` (the parameter gradients: no implementation of the method can skip them, and with few "
        "iterations they are most of the work); steps are the most any sample took. The last column gives one g "
        "and one VJP as written by hand (g without autograd, the VJP by autograd over a graph recorded once), "
        "for comparison with the kernels fpidsl's code calls. fpidsl's step is timed here as the floor's parts "
        "are, run back to back (caches warm with its own weights); table 1's time, taken alternating with the "
        "other contenders, is shown beside it.",
        "",
        table(["workload", "method", "forward (steps x ms)", "backward (steps x ms)", "once ms", "floor ms",
               "fpidsl ms (alone)", "ratio", "target", "fpidsl ms (table 1)", "hand g / VJP ms"], floor_rows),
        "",
        f"## 4. The cost of the language: compiled spec against the same map by hand in `fixed_point` "
        f"(target: at most {TARGET_HAND}x)",
        "",
        table(["workload", "method", "compiled ms", "hand-written ms", "ratio", "target"], hand_rows),
        "",
        f"## 5. Peak memory of a training step, {few} and {many} forced iterations (target: within "
        f"{TARGET_MEMORY:.0%})",
        "",
        "Tensor memory allocated during the step above what was allocated before it ("
        + ("the CUDA allocator's peak, as in benchmarks/memory.py" if DEVICE.type == "cuda" else
           "torch.profiler allocator totals, as in benchmarks/memory.py, less the total at the step's start")
        + "); "
        "Picard, forward and backward forced to exactly that many iterations.",
        "",
        table(["workload", f"fpidsl {few} MiB", f"fpidsl {many} MiB", "change", "target",
               f"unrolled {few} MiB", f"unrolled {many} MiB"], mem_rows),
        "",
        "## 6. The solver's own cost per iteration (the cheap map `0.5 x + z`, forced iteration count)",
        "",
        table(["state shape", "method", "fixed_point µs / iteration", "bare loop µs / iteration", "overhead µs"],
              [[shape, m, f"{a * 1e6:.1f}", f"{b * 1e6:.1f}", f"{(a - b) * 1e6:.1f}"] for shape, m, a, b in over]),
        "",
    ]
    if comp is not None:
        w, rows = comp
        parts += [
            f"## 7. `compile=True` (torch.compile of step and backward map), `{w.name}`, Picard",
            "",
            table(["variant", "first call s (includes compiling)", "median step ms", "forward iters",
                   "grad rel. diff to eager"],
                  [[name, f"{first:.2f}", ms(med), str(iters), f"{err:.1e}"] for name, first, med, iters, err in rows]),
            "",
        ]
    return "\n".join(parts)


def device_name() -> str:
    """The device the tables ran on, in words (a GPU by its name)."""
    if DEVICE.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(DEVICE)} (CUDA {torch.version.cuda})"
    return "CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few repeats (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5, quick 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the tables run")
    parser.add_argument("--out", type=Path, default=None,
                        help="default docs/BENCHMARKS.md, with --device cuda docs/BENCHMARKS_GPU.md")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile=True measurement")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.out is None:
        args.out = HERE.parent / "docs" / ("BENCHMARKS.md" if args.device == "cpu" else "BENCHMARKS_GPU.md")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.iterations = (5, 40) if args.quick else (20, 400)
    if args.quick:
        args.no_compile = True
    text = run(args)
    notes = ""
    if args.out.exists():
        old = args.out.read_text()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER):]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n" + (notes or NOTES_MARKER + "\n"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
