"""torch.compile of a whole model containing a compiled layer: first-call and steady-state time of a training
step, against eager, on the box projection layer (BoxProjectionNN, Anderson) inside a small model.

    python benchmarks/torch_compile_model.py             # batch 256, 30 timed steps, one torch thread
    python benchmarks/torch_compile_model.py --quick     # batch 32, 3 timed steps
    python benchmarks/torch_compile_model.py --trace-solve   # dynamo traces into the solver (as before issue 15)

The layer and the solve are excluded from dynamo's tracing (``torch.compiler.disable`` on ``CompiledLayer.forward``
and the fixed-point operator): the model around it is compiled, the layer runs as in eager (with ``compile=True``
its step and backward map through their own torch.compile). The script prints the graph breaks that dynamo
reports for the model. Inductor's disk cache starts empty (``--warm-cache`` keeps the default one), so the first
step includes every compilation; the variants run in order in one process and share what the earlier compiled.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

if "--warm-cache" not in sys.argv:  # a first call as a user's first run sees it: inductor's disk cache empty
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fpidsl-inductor-")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fpidsl  # noqa: E402


class Model(nn.Module):
    def __init__(self, compile_layer: bool):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 10))
        self.layer = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")(compile=compile_layer)
        self.decoder = nn.Linear(10, 10)

    def forward(self, a):
        return self.decoder(self.layer(self.encoder(a)))


def train_step(model, opt, a):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(a), a.clamp(-1, 1))
    loss.backward()
    opt.step()
    return float(loss.detach())


def measure(variant: str, batch: int, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = Model(compile_layer=variant.endswith("compile=True"))
    run = torch.compile(model) if variant.startswith("torch.compile") else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    a = 2 * torch.randn(batch, 10)
    start = time.perf_counter()
    train_step(run, opt, a)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(run, opt, a)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def graph_breaks(batch: int) -> int:
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    explanation = dynamo.explain(Model(False))(2 * torch.randn(batch, 10))
    return explanation.graph_break_count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a shared machine)")
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's disk cache (default: a fresh one)")
    ap.add_argument("--trace-solve", action="store_true",
                    help="let dynamo trace into the solve, as fpidsl did before issue 15 (for comparison)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.trace_solve:
        import importlib
        import inspect

        from fpidsl.runtime.layer import CompiledLayer

        operator = importlib.import_module("fpidsl.runtime.fixed_point")  # the module (its name is shadowed)
        operator._run = inspect.unwrap(operator._run)  # both without torch.compiler.disable
        CompiledLayer.forward = inspect.unwrap(CompiledLayer.forward)
    batch, steps = (32, 3) if args.quick else (256, 30)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, {steps} timed steps")
    print(f"graph breaks dynamo reports for the model: {graph_breaks(batch)}")
    print("| variant | first step s | median step ms |\n|---|---|---|")
    variants = ["eager", "eager, compile=True", "torch.compile(model)", "torch.compile(model), compile=True"]
    for variant in variants[2:] if args.trace_solve else variants:
        first, median = measure(variant, batch, steps)
        print(f"| {variant} | {first:.2f} | {1000 * median:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
