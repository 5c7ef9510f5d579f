"""Train a compiled fpidsl layer with DistributedDataParallel (one process per CPU core or GPU).

Launch with torchrun, on one machine:

    .venv/bin/torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --steps 50

or on several machines (run on each, with its own --node_rank; MASTER is reachable from all):

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=1 --master_addr=MASTER --master_port=29500 \\
        examples/ddp_train.py --steps 50

The backend is gloo on CPU and nccl when CUDA is available (one GPU per process, by LOCAL_RANK). Each process
takes its slice of every global batch; DDP averages the gradients, so training matches one process on the
global batch (tests/test_ddp.py checks that, gradient for gradient). ``--dump-grads FILE`` writes the
gradients after the first step (from rank 0) for that check.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import fpidsl

SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "specs", "box_projection.fpi")


def global_batch(step: int, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch, the same on every process (seeded by the step)."""
    gen = torch.Generator().manual_seed(1000 + step)
    a = 2 * torch.randn(size, 10, generator=gen, dtype=dtype)
    return a, a.clamp(-1, 1)


def make_layer(dtype: torch.dtype, tol: float):
    torch.manual_seed(0)  # identical initial weights everywhere
    cls = fpidsl.load(SPEC, name="BoxProjectionNN")
    return cls(solve={"tol": tol, "max_iter": 1000}, backward={"tol": tol, "max_iter": 1000}).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--dump-grads", metavar="FILE")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the number of processes ({world})")
    dtype = torch.float64 if args.float64 else torch.float32
    model = DistributedDataParallel(make_layer(dtype, args.tol).to(device))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    local = args.batch // world
    for step in range(args.steps):
        a, target = global_batch(step, args.batch, dtype)
        a, target = a[rank * local:(rank + 1) * local].to(device), target[rank * local:(rank + 1) * local].to(device)
        opt.zero_grad()
        loss = F.mse_loss(model(a), target)
        loss.backward()
        if step == 0 and args.dump_grads and rank == 0:
            torch.save({n: p.grad.detach().cpu() for n, p in model.module.named_parameters()}, args.dump_grads)
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.5f} (rank 0's slice), {model.module.stats}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
