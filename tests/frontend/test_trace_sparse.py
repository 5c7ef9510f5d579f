"""The tracer maps a product with a sparse tensor argument (``torch.sparse.mm(A, x)``, ``torch.mm``, ``A @ x``) onto
``spmm``, with A declared ``input A : sparse [N, M]``; a sparse argument used any other way stays an extern. Trace
on and off (``fpidsl.fixed_point(..., trace=False)``) agree in values and gradients, in float64."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fpidsl.tracing import trace_map, trace_status

from ..runtime.helpers import assert_trace_agrees

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 3000, "on_fail": "raise"}
CSR_BETA = "ignore:Sparse CSR tensor support is in beta state:UserWarning"
N, D, H = 9, 3, 5


class SparseIGNN(nn.Module):
    """x <- relu(W(A x) + U z) on one graph, its nodes the batch; the product written ``product(A, x)``."""

    def __init__(self, product=torch.sparse.mm):
        super().__init__()
        self.W = nn.Linear(H, H, bias=False)
        self.U = nn.Linear(D, H)
        self.product = product
        with torch.no_grad():
            self.W.weight.mul_(0.8 / self.W.weight.abs().sum(1).max())  # |W|∞ < 1, |A|∞ <= 1/2: a contraction

    def forward(self, x, A, z):
        return torch.relu(self.W(self.product(A, x)) + self.U(z))


def _graph(layout: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(N, N, generator=gen, dtype=DT)
    dense = torch.where(torch.rand(N, N, generator=gen) < 0.4, dense, torch.zeros_like(dense))
    dense = 0.5 * dense / (dense.abs().sum(1, keepdim=True) + 1e-3)
    return dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()


def _problem(product, layout: str):
    torch.manual_seed(0)
    f = SparseIGNN(product).to(DT)
    z = torch.randn(N, D, dtype=DT, requires_grad=True)
    return f, torch.zeros(N, H, dtype=DT), _graph(layout), z


PRODUCTS = {"sparse.mm": torch.sparse.mm, "mm": torch.mm, "matmul": torch.matmul, "@": lambda A, x: A @ x,
            "method": lambda A, x: A.mm(x), "shape read": lambda A, x: torch.sparse.mm(A, x) * (A.shape[1] / N)}


@pytest.mark.filterwarnings(CSR_BETA)
@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("product", sorted(PRODUCTS))
def test_a_sparse_product_traces_to_spmm_and_agrees_with_autograd(product, layout):
    f, x0, A, z = _problem(PRODUCTS[product], layout)
    traced, why = trace_status(f, x0, A, z)
    assert traced is not None and why.startswith("traced: layer SparseIGNN"), why
    text = traced.spec.text
    assert "input A : sparse [9, 9]" in text and "spmm(A, x)" in text, text
    assert "extern" not in text and not traced.spec.externs, text
    assert not traced.layer.SAMPLEWISE  # spmm mixes the nodes: one problem
    assert_trace_agrees(f, x0, (A, z), (z, f.W.weight, f.U.weight), atol_x=1e-10, atol_g=1e-9,
                        backward=TIGHT, **TIGHT)


TRANSPOSED = {"sparse.mm(A.t())": lambda A, x: torch.sparse.mm(A.t(), x), "A.T @": lambda A, x: A.T @ x,
              "transpose(A, 1, 0)": lambda A, x: torch.mm(torch.transpose(A, 1, 0), x),
              "A.mT.mm": lambda A, x: A.mT.mm(x)}


@pytest.mark.filterwarnings(CSR_BETA)
@pytest.mark.parametrize("product, layout", [(p, layout) for p in sorted(TRANSPOSED) for layout in ("coo", "csr")
                                             if (p, layout) != ("A.T @", "csr")])  # torch: no CSR.T @ x (as_strided)
def test_a_product_with_a_transposed_sparse_argument_traces_to_spmm_transposed(product, layout):
    f, x0, A, z = _problem(TRANSPOSED[product], layout)
    traced, why = trace_status(f, x0, A, z)
    assert traced is not None, why
    text = traced.spec.text
    assert "input A : sparse [9, 9]" in text and "spmm(A, x, transpose=true)" in text, text
    assert not traced.spec.externs, text
    assert_trace_agrees(f, x0, (A, z), (z, f.W.weight), atol_x=1e-10, atol_g=1e-9, backward=TIGHT, **TIGHT)


def test_a_sparse_argument_used_otherwise_stays_an_extern_with_the_same_numbers():
    """``A.to_dense()`` has no spmm form: A is then a dense-declared input, as before the spmm mapping, and its
    sparse products are externs (a transpose read other than by a product too)."""
    torch.manual_seed(0)
    for product, extern in ((lambda A, x: torch.sparse.mm(A, x) + 0.1 * (A.to_dense() @ x), "to_dense_fn"),
                            (lambda A, x: torch.sparse.mm(A.t(), x) + 0.1 * (A.t().to_dense() @ x), "sparse_mm_fn")):
        f, x0, A, z = _problem(product, "coo")
        traced, why = trace_status(f, x0, A, z)
        assert traced is not None, why
        assert "sparse [" not in traced.spec.text and "spmm(" not in traced.spec.text, traced.spec.text
        assert extern in traced.spec.externs, traced.spec.text
        assert_trace_agrees(f, x0, (A, z), (z, f.W.weight), atol_x=1e-10, atol_g=1e-9, backward=TIGHT, **TIGHT)


def test_the_traced_spmm_layer_runs_at_another_graph():
    """The compiled layer's step on another sparse graph of the same size gives the map's numbers."""
    f, x0, A, z = _problem(torch.sparse.mm, "coo")
    traced = trace_map(f, x0, [A, z])
    other = _graph("coo", seed=5)
    x = torch.randn(N, H, dtype=DT)
    got = traced.layer.step(x, *traced.arguments([other, z]), *traced.tensors())
    torch.testing.assert_close(got, f(x, other, z), rtol=0, atol=1e-12)


def test_a_sparse_argument_that_requires_grad_is_not_declared_sparse():
    """A sparse input gets no gradient in a layer: an A that requires grad keeps the dense declaration (extern)."""
    f, x0, A, z = _problem(torch.sparse.mm, "coo")
    traced = trace_map(f, x0, [A.requires_grad_(), z])
    assert "sparse [" not in traced.spec.text and "sparse_mm_fn" in traced.spec.externs, traced.spec.text
