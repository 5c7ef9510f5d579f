"""The model zoo (specs/zoo/): each model's spec and layer, and the toy inputs it is run on.

One table, read by the zoo's tests (tests/zoo/test_zoo.py) and by examples/zoo_report.py (docs/ZOO.md's
iteration table and convergence plots). Inputs are float64 and drawn from a ``torch.Generator``, so both see the
same numbers for the same seed. Nothing here imports fpidsl.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

ZOO = Path(__file__).resolve().parent.parent / "specs" / "zoo"
DTYPE = torch.float64


@dataclass(frozen=True)
class ZooModel:
    """A zoo layer: ``inputs(gen, batch)`` draws its inputs in declaration order (on one graph, ``batch + 5``
    nodes: the nodes are the batch); its derivatives are compared in ``wrt``, an input and a parameter (input
    names, or ``named_parameters`` names: token ids have none, so their embedding stands for them); ``unroll``
    plain iterations from the layer's start reach its fixed point to float64 precision; ``lr`` is the learning rate of
    the test's Adam steps (smaller for the MDEQs, whose bias-free convolutions start at 0.01: a step of 0.01 would
    move them by their own size)."""

    key: str
    spec: str
    layer: str
    paper: str
    inputs: Callable[[torch.Generator, int], tuple[Tensor, ...]]
    wrt: tuple[str, str]
    unroll: int = 300
    lr: float = 1e-2  # the learning rate of the zoo test's few Adam steps

    @property
    def path(self) -> Path:
        return ZOO / self.spec


def requiring_grad(tensors) -> tuple[Tensor, ...]:
    """The dense float tensors set to require grad; index (int) and sparse inputs, which take none, as they are."""
    return tuple(t.requires_grad_() if t.layout == torch.strided and t.is_floating_point() else t for t in tensors)


def normal(gen: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=gen, dtype=DTYPE)


def normalized_graphs(gen: torch.Generator, batch: int, nodes: int, p: float = 0.4) -> Tensor:
    """Random undirected graphs with self-loops, as D^-1/2 (A + I) D^-1/2 (spectral radius 1)."""
    edges = (torch.rand(batch, nodes, nodes, generator=gen, dtype=DTYPE) < p).to(DTYPE)
    adjacency = ((edges + edges.transpose(1, 2)) > 0).to(DTYPE) + torch.eye(nodes, dtype=DTYPE)
    scale = adjacency.sum(-1).rsqrt()
    return scale[:, :, None] * adjacency * scale[:, None, :]


def directed_graphs(gen: torch.Generator, batch: int, nodes: int, p: float = 0.4) -> Tensor:
    """Random directed graphs with self-loops, row-normalised D^-1 (A + I) (spectral radius 1): ``A[j, i]`` the
    weight of the edge j -> i, not symmetric, so that A and its transpose give different layers (the IGNNs
    propagate by A^T, as Gu et al.'s W X A with the nodes as columns)."""
    edges = (torch.rand(batch, nodes, nodes, generator=gen, dtype=DTYPE) < p).to(DTYPE)
    adjacency = edges * (1 - torch.eye(nodes, dtype=DTYPE)) + torch.eye(nodes, dtype=DTYPE)
    return adjacency / adjacency.sum(-1, keepdim=True)


def sparse_graph(gen: torch.Generator, nodes: int) -> Tensor:
    """One random directed graph of ``nodes`` nodes, normalised as in :func:`directed_graphs`, as a sparse COO
    tensor."""
    return directed_graphs(gen, 1, nodes, p=0.3)[0].to_sparse()


def pixel_grid(batch: int, side: int) -> Tensor:
    """Each pixel's (x, y) in grid_sample's [-1, 1] coordinates (align_corners=True), ``[batch, side, side, 2]``."""
    line = torch.linspace(-1, 1, side, dtype=DTYPE)
    y, x = torch.meshgrid(line, line, indexing="ij")
    return torch.stack([x, y], dim=-1).expand(batch, side, side, 2).contiguous()


MODELS = [
    ZooModel("mondeq", "mondeq.fpi", "MonDEQ", "Winston & Kolter 2020",
             lambda g, b: (normal(g, b, 4),), ("x", "A")),
    ZooModel("hopfield", "hopfield.fpi", "Hopfield", "Ramsauer et al. 2021",
             lambda g, b: (normal(g, b, 5, 4), normal(g, b, 4)), ("Y", "WK.weight")),
    ZooModel("ista", "lista.fpi", "ISTA", "Beck & Teboulle 2009",
             lambda g, b: (normal(g, b, 8),), ("y", "A"), unroll=400),
    ZooModel("lista", "lista.fpi", "LISTA", "Gregor & LeCun 2010",
             lambda g, b: (normal(g, b, 8),), ("y", "S")),
    ZooModel("sinkhorn", "sinkhorn.fpi", "Sinkhorn", "Cuturi 2013",
             lambda g, b: (normal(g, b, 5, 3), normal(g, b, 4, 3)), ("u", "P.weight")),
    ZooModel("implicit_euler", "implicit_euler.fpi", "ImplicitEuler", "Chen et al. 2018",
             lambda g, b: (normal(g, b, 4),), ("y0", "fc1.weight")),
    ZooModel("icnn", "icnn.fpi", "ICNN", "Amos, Xu & Kolter 2017",
             lambda g, b: (normal(g, b, 4),), ("x", "W0.weight")),
    ZooModel("qp", "qp.fpi", "BoxQP", "Amos & Kolter 2017",
             lambda g, b: (normal(g, b, 4, scale=2.0),), ("a", "L")),
    ZooModel("ignn", "ignn.fpi", "IGNN", "Gu et al. 2020",
             lambda g, b: (directed_graphs(g, b, 6), normal(g, b, 6, 3)), ("U", "V")),
    ZooModel("mdeq", "mdeq.fpi", "MDEQCell", "Bai, Koltun & Kolter 2020",
             lambda g, b: (normal(g, b, 4, 5, 5),), ("x", "conv1.weight"), unroll=250, lr=1e-3),
    ZooModel("mdeq_two_scale", "mdeq_two_scale.fpi", "MDEQTwoScale", "Bai, Koltun & Kolter 2020",
             lambda g, b: (normal(g, b, 4, 4, 4),), ("x", "down.weight"), unroll=200, lr=1e-3),
    ZooModel("deq_flow", "deq_flow.fpi", "DEQFlow", "Bai, Geng, Savani & Kolter 2022",
             lambda g, b: (normal(g, b, 4, 6, 6), normal(g, b, 4, 6, 6), normal(g, b, 4, 6, 6), pixel_grid(b, 6)),
             ("f2", "convq.weight"), unroll=150),
    ZooModel("ignn_sparse", "ignn_sparse.fpi", "IGNNSparse", "Gu et al. 2020",
             lambda g, b: (sparse_graph(g, b + 5), normal(g, b + 5, 3)), ("U", "V")),
    ZooModel("deq_transformer", "deq_transformer.fpi", "DEQTransformer", "Bai, Kolter & Koltun 2019",
             lambda g, b: (torch.randint(0, 11, (b, 6), generator=g),), ("emb.weight", "qkv.weight"),
             unroll=200),
]
