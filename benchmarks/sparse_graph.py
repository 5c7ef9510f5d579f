"""IGNN on one graph: the layer with its adjacency as a sparse input (spmm) against the same layer with a dense one (@).

    python benchmarks/sparse_graph.py [--nodes 4000] [--degree 5] [--features 16] [--repeat 5] [--threads N]
                                      [--products-only] [--quick]

Both layers are X = tanh(A (X W) + U) on a random graph of ``--nodes`` nodes with ``--degree`` neighbours each
(A row-normalised to 1/2, so the map contracts), float32 on the CPU. It prints, per form, the best of ``--repeat``
runs (the least disturbed by other load) of one forward solve and of one forward + backward (the gradient of a sum
in U and W), the iteration counts, the bytes of A, and the largest difference between the two forms' fixed
points; then the best of 30 single products A x and Aᵀ x: torch.sparse.mm of the COO and of the CSR matrix (whose
transpose is a CSC one) against fpidsl's ``spmm`` (CSR forms of A and Aᵀ made once per matrix). ``--products-only``
skips the layers.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import fpidsl  # noqa: E402

SPEC = """
layer Graph {{
  const D = {features}
  input A : {kind}[N, N]
  input U : [N, D]
  state X : [N, D]
  param W : tensor [D, D] = normal(0, 0.2)
  update X = tanh({product} + U)
  solve {{ tol = 1e-5, max_iter = 200 }}
  backward {{ tol = 1e-5, max_iter = 200 }}
}}
"""
FORMS = {"sparse (spmm)": ("sparse ", "spmm(A, X @ W)"), "dense (@)": ("", "A @ (X @ W)")}


def graph(nodes: int, degree: int, gen: torch.Generator) -> torch.Tensor:
    """A sparse COO adjacency with ``degree`` random neighbours per node, each row summing to 1/2."""
    rows = torch.arange(nodes).repeat_interleave(degree)
    cols = torch.randint(0, nodes, (nodes * degree,), generator=gen)
    values = torch.full((nodes * degree,), 0.5 / degree)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (nodes, nodes), check_invariants=True).coalesce()


def _best_seconds(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4000)
    parser.add_argument("--degree", type=int, default=5)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument("--products-only", action="store_true", help="only the table of single products")
    parser.add_argument("--quick", action="store_true", help="a small graph, one run (a smoke test)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.nodes, args.repeat = 200, 1
    gen = torch.Generator().manual_seed(0)
    sparse = graph(args.nodes, args.degree, gen)
    U = torch.randn(args.nodes, args.features, generator=gen)
    folder = pathlib.Path(tempfile.mkdtemp())
    x = torch.randn(args.nodes, args.features, generator=gen)
    print(f"IGNN on one graph: {args.nodes} nodes, {args.degree} neighbours each, {args.features} features, float32, "
          f"{torch.get_num_threads()} threads; best of {args.repeat}")
    if not args.products_only:
        _layers(args, sparse, U, folder)
    _products(sparse, x)
    return 0


def _layers(args, sparse, U, folder) -> None:
    inputs = {"sparse (spmm)": sparse, "dense (@)": sparse.to_dense()}
    print("| form | bytes of A | forward (s) | forward + backward (s) | iterations (fwd, bwd) |")
    print("|---|---|---|---|---|")
    results = {}
    for name, (kind, product) in FORMS.items():
        path = folder / f"{kind.strip() or 'dense'}.fpi"
        path.write_text(SPEC.format(kind=kind, product=product, features=args.features))
        torch.manual_seed(1)
        layer = fpidsl.load(path)()
        A = inputs[name]
        u = U.clone().requires_grad_()
        forward = _best_seconds(lambda: layer(A, u).detach(), args.repeat)

        def both():
            torch.autograd.grad(layer(A, u).sum(), [u, layer.W])

        both_time = _best_seconds(both, args.repeat)
        stats = layer.stats
        iters = (int(stats.forward.iterations.max()), int(stats.adjoint.forward.iterations.max()))
        size = (A.values().numel() * 4 + A.indices().numel() * 8) if A.layout == torch.sparse_coo else A.numel() * 4
        results[name] = layer(A, U).detach()
        print(f"| {name} | {size:,} | {forward:.3f} | {both_time:.3f} | {iters[0]}, {iters[1]} |")
    diff = (results["sparse (spmm)"] - results["dense (@)"]).abs().max().item()
    print(f"largest difference between the fixed points: {diff:.1e}")


def _products(sparse, x) -> None:
    import warnings

    from fpidsl.runtime.ops import spmm

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        csr = sparse.to_sparse_csr()
    products = {"torch.sparse.mm(A, x), A COO": lambda: torch.sparse.mm(sparse, x),
                "torch.sparse.mm(A.t(), x), A COO": lambda: torch.sparse.mm(sparse.t(), x),
                "torch.sparse.mm(A, x), A CSR": lambda: torch.sparse.mm(csr, x),
                "torch.sparse.mm(A.t(), x), A CSR (a CSC matrix)": lambda: torch.sparse.mm(csr.t(), x),
                "spmm(A, x)": lambda: spmm(sparse, x), "spmm(A, x, transpose=True)": lambda: spmm(sparse, x, transpose=True)}
    print("| product | best of 30 (ms) |")
    print("|---|---|")
    for name, fn in products.items():
        print(f"| {name} | {_best_seconds(fn, 30) * 1e3:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
