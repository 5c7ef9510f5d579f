"""Maps that mix the samples of a batch: ``fixed_point`` solves them as one problem, traced or not.

The solver judges and freezes each sample alone; for a map that mixes them a sample frozen early came back at a
point that was no longer fixed once its neighbours moved (0.47 off, 1.2 in the gradient, no warning), on the
traced path (which knew the map mixes) and on the autograd path (:mod:`fpidsl.runtime.mixing` probes it). The
oracle: plain iteration of the whole batch for the fixed point, and the implicit-function gradient from dense
Jacobians of the whole batch (float64, 12 unknowns).
"""
from __future__ import annotations

import pytest
import torch

from fpidsl.runtime import FixedPoint, fixed_point
from fpidsl.runtime.mixing import mixes_samples
from fpidsl.tracing import trace_status

from .test_host_syncs import HostReads

DTYPE = torch.float64


def _mean_coupled(x, a, c):
    return c * torch.tanh(x) + a + 0.3 * torch.tanh(x.mean(0))


def _threshold_coupled(x, a, c):
    return c * torch.tanh(x) + a + 0.5 * torch.relu(x.amax(0, keepdim=True) - 1)


def _case(kind: str):
    """(map, a, c): row 0 of the mean case is at its own fixed point at the start (a = 0); the threshold case's
    rows converge at very different speeds and meet the coupling only late (the fast row is done before)."""
    if kind == "mean":
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(4, 3, generator=gen, dtype=DTYPE)
        a[0] = 0.0
        return _mean_coupled, a, torch.tensor([[0.5], [0.5], [0.9], [0.9]], dtype=DTYPE)
    return (_threshold_coupled, torch.tensor([[0.1], [0.3]], dtype=DTYPE),
            torch.tensor([[0.01], [0.95]], dtype=DTYPE))


def _oracle(g, a, c, w):
    """The whole batch's fixed point (plain iteration) and d(sum(w * x*))/da by the implicit function theorem."""
    x = torch.zeros_like(a)
    with torch.no_grad():
        for _ in range(3000):
            x = g(x, a, c)
    n = x.numel()
    jx = torch.autograd.functional.jacobian(lambda y: g(y, a, c), x).reshape(n, n)
    ja = torch.autograd.functional.jacobian(lambda b: g(x, b, c), a).reshape(n, a.numel())
    lam = torch.linalg.solve((torch.eye(n, dtype=DTYPE) - jx).T, w.reshape(n))
    return x, (ja.T @ lam).reshape(a.shape)


@pytest.mark.parametrize("kind", ["mean", "threshold"])
@pytest.mark.parametrize("how", ["trace", "autograd", "module"])
def test_a_map_that_mixes_samples_gets_the_fixed_point_and_gradient_of_the_whole_batch(kind, how):
    g, a, c = _case(kind)
    w = torch.linspace(0.5, 1.5, a.numel(), dtype=DTYPE).reshape(a.shape).expand(a.shape[0], 3 if kind == "mean"
                                                                                  else 1).clone()
    a = a.expand_as(w).clone() if kind == "threshold" else a
    x_star, grad_star = _oracle(g, a, c, w)
    a = a.clone().requires_grad_()
    x0 = torch.zeros_like(w)
    options = dict(tol=1e-11, backward={"tol": 1e-12}, max_iter=5000)
    if how == "module":
        x = FixedPoint(g, solve={"tol": 1e-11, "max_iter": 5000}, backward={"tol": 1e-12}, trace=False)(x0, a, c)
    else:
        x = fixed_point(g, x0, a, c, trace=how == "trace", **options)
    (grad,) = torch.autograd.grad((w * x).sum(), a)
    torch.testing.assert_close(x, x_star, rtol=0, atol=1e-9)
    torch.testing.assert_close(grad, grad_star, rtol=0, atol=1e-8)
    if how == "trace":
        assert "samples solved jointly" in trace_status(g, x0, a, c)[1]


def test_a_traced_map_that_mixes_is_solved_jointly_even_with_batched_arguments():
    """``batched`` lets the solver drop finished samples from the work: never for a map that mixes them."""
    g, a, c = _case("mean")
    x_star, _ = _oracle(g, a, c, torch.ones_like(a))
    x, stats = fixed_point(g, torch.zeros_like(a), a, c, batched=[True, True], tol=1e-11, return_stats=True)
    torch.testing.assert_close(x, x_star, rtol=0, atol=1e-9)
    assert stats.forward.iterations.shape == (1,)  # one problem


@pytest.mark.parametrize("trace", [True, False])
def test_a_samplewise_map_is_still_judged_per_sample(trace):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, generator=gen, dtype=DTYPE)
    c = torch.tensor([[0.1], [0.5], [0.8], [0.95]], dtype=DTYPE)
    _, stats = fixed_point(lambda x, a, c: c * torch.tanh(x) + a, torch.zeros_like(a), a, c, tol=1e-10,
                           trace=trace, return_stats=True)
    iterations = stats.forward.iterations.tolist()
    assert len(iterations) == 4 and len(set(iterations)) == 4


@pytest.mark.parametrize("mixing", [
    lambda x: x + x.mean(0), lambda x: x.flip(0), lambda x: torch.roll(x, 1, 0), lambda x: x.cumsum(0),
    lambda x: torch.softmax(x, 0), lambda x: x / x.norm(), lambda x: (x.T @ x)[:, :1].T.expand_as(x),
    lambda x: x.reshape(-1)[torch.arange(x.numel()).roll(1)].reshape(x.shape),
    lambda x: torch.nn.functional.batch_norm(x, None, None, training=True),
    lambda x: x + torch.relu(x.amax(0) - 3), lambda x: x + torch.relu(-2 - x.amin(0)),
    lambda x: torch.cat([x[:1], x[1:] + x[1:].mean(0)]),  # the first sample alone, the others mixed
    lambda x: x + torch.exp(-torch.cdist(x, x) ** 2) @ x,  # a kernel that far moves switch off
    lambda x: x + (x.amax(0) - x.amin(0) < 2).to(x.dtype) * x.mean(0),  # mixing while the batch is close
], ids=["mean", "flip", "roll", "cumsum", "softmax0", "norm", "gram", "flat-roll", "batch-norm", "max", "min",
        "rest-mixed", "rbf", "gated"])
def test_the_probe_finds_every_kind_of_mixing(mixing):
    assert mixes_samples(lambda xs: (mixing(xs[0]),), (torch.zeros(5, 4, dtype=DTYPE),))


@pytest.mark.parametrize("samplewise", [
    lambda x: torch.tanh(x) + 1, lambda x: x.mean(1, keepdim=True) * x, lambda x: torch.softmax(x, 1),
    lambda x: x @ torch.ones(4, 4, dtype=DTYPE), lambda x: torch.exp(10 * x),
], ids=["tanh", "row-mean", "row-softmax", "product", "overflowing"])
def test_the_probe_passes_samplewise_maps(samplewise):
    assert not mixes_samples(lambda xs: (samplewise(xs[0]),), (torch.zeros(5, 4, dtype=DTYPE),))


def test_the_probe_leaves_random_numbers_and_buffers_as_they_were():
    """A map with dropout gives other values at every call: taken as samplewise (not probed), and the probe's
    evaluations draw no number the caller would miss; batch norm's running statistics count the solve's
    evaluations only."""
    def dropout(x, a):
        return 0.5 * torch.nn.functional.dropout(torch.tanh(x), 0.1, training=True) + a

    a = torch.randn(4, 3, dtype=DTYPE)
    drawn = []
    for per_sample in (None, True):
        torch.manual_seed(0)
        x, stats = fixed_point(dropout, torch.zeros_like(a), a, trace=False, per_sample=per_sample,
                               on_fail="ignore", max_iter=20, return_stats=True)
        drawn.append((x, stats.forward.iterations, torch.rand(3)))
    torch.testing.assert_close(drawn[0][0], drawn[1][0], rtol=0, atol=0)
    assert drawn[0][1].tolist() == drawn[1][1].tolist() and len(drawn[0][1]) == 4
    torch.testing.assert_close(drawn[0][2], drawn[1][2], rtol=0, atol=0)

    means = []
    for per_sample in (None, False):
        torch.manual_seed(0)
        norm = torch.nn.BatchNorm1d(3, dtype=DTYPE)
        fixed_point(lambda x, a: 0.5 * torch.tanh(norm(x)) + a, torch.zeros_like(a), a, trace=False,
                    per_sample=per_sample, tol=1e-10)
        means.append((norm.running_mean.clone(), int(norm.num_batches_tracked)))
    torch.testing.assert_close(means[0][0], means[1][0], rtol=0, atol=0)
    assert means[0][1] == means[1][1]


def test_the_probe_reads_the_host_once():
    def g(x, a):
        return 0.5 * torch.tanh(x) + a

    a = torch.randn(4, 3, dtype=DTYPE)
    counts = []
    for per_sample in (None, True):
        with HostReads() as reads:
            fixed_point(g, torch.zeros_like(a), a, trace=False, per_sample=per_sample, check_every=1000,
                        max_iter=40, on_fail="ignore")
        counts.append(reads.count)
    assert counts[0] == counts[1] + 1


@pytest.mark.parametrize("dim", [1, 0])
def test_a_traced_map_with_an_extern_is_probed(dim):
    """``torch.cumsum`` has no primitive: an extern, declared mixing. Over the features the map is samplewise
    (judged per sample, as before), over the batch it mixes (one problem, the whole batch's fixed point)."""
    def g(x, a):
        return 0.3 * torch.tanh(torch.cumsum(x, dim)) + a

    a = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    x, stats = fixed_point(g, torch.zeros_like(a), a, tol=1e-12, return_stats=True)
    assert "samples probed" in trace_status(g, torch.zeros_like(a), a)[1]
    assert stats.forward.iterations.shape == ((4,) if dim == 1 else (1,))
    x_star = torch.zeros_like(a)
    for _ in range(500):
        x_star = g(x_star, a)
    torch.testing.assert_close(x, x_star, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mixes", [False, True])
def test_a_traced_map_without_batched_arguments_is_probed(mixes):
    """A map that reads no batched argument is traced with the states' sizes (no named batch): the trace cannot say
    whether it is samplewise; the probe can."""
    def g(x):
        return 0.5 * torch.tanh(x) + 1 + (0.2 * torch.tanh(x.mean(0)) if mixes else 0)

    x0 = torch.zeros(3, 2, dtype=DTYPE)
    x, stats = fixed_point(g, x0, tol=1e-12, return_stats=True)
    assert "samples probed" in trace_status(g, x0)[1]
    assert stats.forward.iterations.shape == ((1,) if mixes else (3,))
    x_star = x0
    for _ in range(500):
        x_star = g(x_star)
    torch.testing.assert_close(x, x_star, rtol=0, atol=1e-10)


def test_a_map_the_probe_moves_out_of_its_domain_still_runs():
    """The probe's far moves can leave a map's domain (an index past a table, a Cholesky factor of a matrix no
    longer positive definite): no answer from that move, never an error the call did not have."""
    table = torch.linspace(0.0, 0.5, 10, dtype=DTYPE)

    def lookup(x, a):
        return 0.5 * table[(x.clamp(0, 0.99) * 10).long()] + a + 0.0 * x

    def cholesky(x, a):
        m = torch.eye(3, dtype=DTYPE) - x.unsqueeze(-1) * x.unsqueeze(-2) / 4
        return 0.2 * torch.linalg.cholesky(m).diagonal(dim1=-2, dim2=-1) + a

    a = 0.1 * torch.rand(4, 3, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    for f in (lookup, cholesky):
        x0 = torch.zeros_like(a)
        x, stats = fixed_point(f, x0, a, trace=False, tol=1e-12, return_stats=True)
        assert stats.forward.iterations.shape == (4,) and bool(stats.forward.converged.all())
        assert torch.equal(x0, torch.zeros_like(a))


def test_explicit_capture_is_probed_and_closure_modules_keep_their_statistics():
    g, a, c = _case("mean")
    x_star, _ = _oracle(g, a, c, torch.ones_like(a))
    x = fixed_point(g, torch.zeros_like(a), a, c, capture="explicit", trace=False, tol=1e-11)
    torch.testing.assert_close(x, x_star, rtol=0, atol=1e-9)

    stats = []
    for per_sample in (None, False):
        norm = torch.nn.BatchNorm1d(3, affine=False, dtype=DTYPE)  # no parameters: found by the walk only
        fixed_point(lambda x, a: 0.5 * torch.tanh(norm(x)) + a, torch.zeros_like(a), a, trace=False,
                    per_sample=per_sample, tol=1e-10)
        stats.append((norm.running_mean.clone(), int(norm.num_batches_tracked)))
    torch.testing.assert_close(stats[0][0], stats[1][0], rtol=0, atol=0)
    assert stats[0][1] == stats[1][1]
