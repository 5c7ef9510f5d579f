"""Peak memory of a training step with 20 and with 400 forced iterations: fpidsl against unrolled autograd.

The map is a convolutional equilibrium layer, ``x <- tanh(conv3x3(x) + conv3x3(z))`` with a 1x1 convolution head
and a mean-squared-error loss; one step is the forward solve, the loss and ``loss.backward()`` (parameter
gradients included). fpidsl runs exactly N iterations forward and N backward (``min_iter = max_iter = N``);
the unrolled baseline applies the map N times under autograd and backpropagates through all of them.

How memory is measured:

- on CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (bytes held by tensors);
- on CPU, the allocation events of ``torch.profiler`` with ``profile_memory=True``: every allocation and free of
  the CPU tensor allocator is recorded with the allocator's running total of bytes allocated since profiling
  began (``total_allocated``, which starts from the tensors alive before profiling); the peak is the largest of
  these totals less the total before the step's first allocation. It counts exactly the tensor memory the
  step allocates (activations, saved tensors, gradients, solver buffers), not Python objects, not what existed
  before the step (parameters, inputs), and not allocator caching. (``tracemalloc`` cannot see torch tensors;
  the process RSS is dominated by the allocator's and the libraries' own behaviour.)

Each configuration runs once unmeasured first (warm-up), then once measured. The script prints a table and exits
with status 1 when fpidsl's 400-iteration peak differs from its 20-iteration peak by more than 10%.

    python benchmarks/memory.py            # batch 8, 1x96x96 images, 16 channels
    python benchmarks/memory.py --quick    # 24x24 images: a few seconds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpidsl.runtime import FixedPoint  # noqa: E402

MiB = 2**20
TOLERANCE = 0.10  # fpidsl's peaks at the two iteration counts may differ by at most this fraction


class ConvMap(nn.Module):
    """``g(x, u) = tanh(conv3x3(x) + u)``: the update of the equilibrium layer (``u`` is the injected input)."""

    def __init__(self, channels: int, scale: float = 0.3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(scale)  # a contraction: the solves converge

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x) + u)


class Model(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.inject = nn.Conv2d(1, channels, 3, padding=1)
        self.map = ConvMap(channels)
        self.head = nn.Conv2d(channels, 1, 1)
        self.channels = channels

    def state0(self, z: torch.Tensor) -> torch.Tensor:
        return z.new_zeros(z.shape[0], self.channels, *z.shape[2:])


def fpidsl_step(model: Model, iterations: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    forced = {"min_iter": iterations, "max_iter": iterations, "on_fail": "ignore"}
    layer = FixedPoint(model.map, solve=forced, backward=forced)

    def step(z: torch.Tensor, target: torch.Tensor) -> None:
        x = layer(model.state0(z), model.inject(z))
        F.mse_loss(model.head(x), target).backward()
        assert int(layer.stats.forward.iterations.max()) == iterations
        assert int(layer.stats.backward.iterations.max()) == iterations

    return step


def unrolled_step(model: Model, iterations: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def step(z: torch.Tensor, target: torch.Tensor) -> None:
        u = model.inject(z)
        x = model.state0(z)
        for _ in range(iterations):
            x = model.map(x, u)
        F.mse_loss(model.head(x), target).backward()

    return step


def peak_bytes_cpu(run: Callable[[], None]) -> int:
    """Peak tensor bytes allocated by ``run`` above what was allocated when it started: the largest running total
    of the CPU allocator's events, less the total just before the first allocation of the step (the running
    total includes the tensors alive before profiling began)."""
    import gc

    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
    if not events:
        return 0
    events.sort()
    base = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - base


def peak_bytes_cuda(run: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(kind: str, iterations: int, args: argparse.Namespace, device: torch.device) -> tuple[int, float]:
    torch.manual_seed(0)
    model = Model(args.channels).to(device)
    z = torch.randn(args.batch, 1, args.size, args.size, device=device)
    target = torch.randn(args.batch, 1, args.size, args.size, device=device)
    step = (fpidsl_step if kind == "fpidsl" else unrolled_step)(model, iterations)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        step(z, target)

    run()  # warm-up: lazy initialisation is not part of the figure
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    peak = (peak_bytes_cuda if device.type == "cuda" else peak_bytes_cpu)(lambda: step(z, target))
    return peak, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="24x24 images (a few seconds)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=None, help="image side (default 96, 24 with --quick)")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--iterations", type=int, nargs=2, default=[20, 400], metavar=("FEW", "MANY"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.size = args.size or (24 if args.quick else 96)
    device = torch.device(args.device)

    rows = []
    for kind in ("fpidsl", "unrolled"):
        for n in args.iterations:
            peak, seconds = measure(kind, n, args, device)
            rows.append((kind, n, peak, seconds))
            print(f"measured {kind} with {n} iterations", file=sys.stderr, flush=True)

    print(f"peak memory of one training step (forward + backward): batch {args.batch}, "
          f"1x{args.size}x{args.size} images, {args.channels} channels, float32, {device.type}")
    print(f"{'method':<10} {'iterations':>10} {'peak MiB':>10} {'seconds (measured run, profiler on)':>36}")
    for kind, n, peak, seconds in rows:
        print(f"{kind:<10} {n:>10} {peak / MiB:>10.2f} {seconds:>36.2f}")
    few, many = (peak for kind, _, peak, _ in rows if kind == "fpidsl")
    change = (many - few) / few
    verdict = "OK" if abs(change) <= TOLERANCE else "FAIL"
    print(f"fpidsl {args.iterations[1]} vs {args.iterations[0]} iterations: {change:+.1%} "
          f"(limit {TOLERANCE:.0%}) {verdict}")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
