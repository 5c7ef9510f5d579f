"""The native judgement of the iteration loop (judge_step.c, driver._NativeJudge) against the tensor code.

The tensor code is the oracle: ``r = g - x``, :func:`driver._judge`, ``track.remember`` and ``verdict.done`` on a copy
of the same tracker, for every combination of the judgement's tests (criterion, first or later iteration, before or
after ``min_iter``, with and without the precision-floor test) and on rows made to hit each outcome (converged,
diverged by a non-finite or a growing step, at the floor, an exact fixed point, a start from zero, a worse
iteration). Whole solves with the kernels on and off must give the same records.
"""
import contextlib
import os
import shutil
import warnings

import pytest
import torch

from fpidsl.runtime import driver, fixed_point, native
from fpidsl.runtime.settings import SolverSettings

HAS_COMPILER = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "cc", "gcc"))
TURNED_OFF = os.environ.get("FPIDSL_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")
pytestmark = pytest.mark.skipif(not HAS_COMPILER or TURNED_OFF,
                            reason="the native kernels cannot be built here (no C compiler) or FPIDSL_NATIVE is off")

TRACKED = ("best_rel", "best_step", "checked_rel", "best_value", "best_at", "shrank")


def _rows(dtype, dim=37, seed=0):
    """x, g and a tracker (as after some iterations) whose rows reach every outcome of the judgement."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(12, dim, generator=gen, dtype=dtype)
    g = x + 1e-3 * torch.randn(12, dim, generator=gen, dtype=dtype)
    g[1] = x[1] + 1e-9 * torch.randn(dim, generator=gen, dtype=dtype)  # converged at tol 1e-6
    g[2, 3] = float("nan")  # diverged: not finite
    g[3, 0] = float("inf")
    g[4] = x[4] + 10.0  # a step 1e4 times the best: diverged by growth
    g[5] = x[5]  # an exact fixed point: rel 0
    x[6] = 0.0  # the first step from zero: rel inf
    g[7] = x[7] * (1 + 1e-17)  # the floor: rel at rounding noise, no new low since the last floor check
    g[8] = x[8] + 1.0  # worse than the best: not better
    g[9] = torch.zeros(dim, dtype=dtype)  # x and g both zero below
    x[9] = 0.0
    track = driver._Tracker.start(12, x, False)
    track.best_rel = torch.full((12,), 1e-4, dtype=dtype)
    track.best_step = torch.full((12,), 1e-3, dtype=dtype)
    track.checked_rel = torch.full((12,), 1e-4, dtype=dtype)
    track.best_rel[7] = track.checked_rel[7] = 0.0
    track.best_step[4] = 1e-4
    track.best_value = torch.randn(12, dim, generator=gen, dtype=dtype)
    track.best_at = torch.arange(12)
    track.shrank = torch.arange(12) % 2 == 0
    return x, g, track


def _copy(track):
    return driver._Tracker(*(getattr(track, f).clone() for f in ("best_rel", "best_step", "checked_rel",
                                                                 "best_value", "best_at", "shrank")), track.relative)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("n, min_iter", [(1, 0), (3, 0), (3, 5), (10, 0), (10, 11), (20, 20)])
def test_the_native_judge_gives_the_tensor_codes_verdict(dtype, tol, relative, n, min_iter):
    s = SolverSettings(tol=1e-6, criterion="relative" if relative else "absolute", min_iter=min_iter)
    x, g, track = _rows(dtype)
    track.relative = relative
    thresholds = driver._Thresholds.of(s, x)
    oracle = _copy(track)
    r_ref = g - x
    want = driver._judge(n, x, r_ref, oracle, s, thresholds)
    oracle.remember(n, want.better, g)
    judge = driver._NativeJudge.of(x, s, thresholds, relative)
    assert judge is not None
    r, got, done, finished = judge(n, x, g, track)
    torch.testing.assert_close(r, r_ref, rtol=0, atol=0, equal_nan=True)
    for name in ("step", "norm", "residual"):
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), name
        finite = a.isfinite()
        torch.testing.assert_close(a[finite], b[finite], rtol=tol, atol=0, msg=name)
    for name in ("converged", "floor"):
        assert (getattr(got, name) is None) == (getattr(want, name) is None), name
        if getattr(want, name) is not None:
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.diverged, want.diverged) and torch.equal(got.better, want.better)
    assert torch.equal(done, want.done) and finished == int(want.done.sum())
    for name in TRACKED:
        a, b = getattr(track, name), getattr(oracle, name)
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=tol, atol=0, equal_nan=True, msg=name)
        else:
            assert torch.equal(a, b), name
    # the rows were made to reach each outcome (with the tests this case makes)
    assert want.diverged[[2, 3]].all() and bool(want.diverged[4]) == (n > 1)
    if want.converged is not None:
        assert want.converged[1] and want.converged[5]
    if want.floor is not None:
        assert want.floor[7]
    assert not want.better[8]


def test_a_strided_map_value_is_judged_by_the_tensor_code(monkeypatch):
    """An iteration whose g the kernel cannot take (a transposed, non-contiguous tensor) runs the tensor code; the
    solve's record is the one it gets with the kernels off."""
    calls = []
    real = native.judge_step
    monkeypatch.setattr(native, "judge_step", lambda *a: calls.append(1) or real(*a))
    W = torch.randn(6, 6, dtype=torch.float64) * 0.15
    z = torch.randn(6, 4, dtype=torch.float64)

    def strided(x):  # x (4, 6): g is the transpose of a (6, 4) tensor, every other call
        y = (torch.tanh(W @ x.t()) + z).t()
        strided.calls += 1
        return y if strided.calls % 2 else y.contiguous()

    strided.calls = 0
    x0 = torch.zeros(4, 6, dtype=torch.float64)
    got, stats = fixed_point(strided, x0, tol=1e-10, return_stats=True, trace=False)
    assert calls and len(calls) < strided.calls  # both codes ran
    strided.calls = 0
    with native.turned_off():
        want, ref = fixed_point(strided, x0, tol=1e-10, return_stats=True, trace=False)
    assert torch.equal(stats.forward.iterations, ref.forward.iterations)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def _failing_map(dtype):
    """A batch of 5 samples: two contract (they converge), one steps by 1 for ever (out of iterations), one has no
    fixed point and overflows (diverged), one is chaotic (out of iterations: its best iterate)."""
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(2, 16, 16, generator=gen, dtype=dtype)
    A = A / torch.linalg.matrix_norm(A, ord=2).view(2, 1, 1) * torch.tensor([0.5, 0.9], dtype=dtype).view(2, 1, 1)
    b = torch.randn(2, 16, generator=gen, dtype=dtype)

    def f(x):
        return torch.cat([torch.einsum("bij,bj->bi", A, x[:2]) + b, x[2:3] + 1.0, torch.exp(x[3:4]) + 1.0,
                          2.5 * torch.sin(3.0 * x[4:5]) + 0.3])

    return f


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
@pytest.mark.parametrize("criterion, min_iter", [("absolute", 0), ("relative", 0), ("relative", 7)])
@pytest.mark.parametrize("check_every", [1, 4])
def test_whole_solves_keep_their_records_with_the_native_judge(monkeypatch, dtype, method, criterion, min_iter,
                                                                check_every):
    """Every field of the record and the results, with the native judge and with the tensor code's (the solvers'
    kernels in use for both: the iterates are the same), failing samples included (their best iterate; the history
    of residuals; the halfway residual), checked every iteration and every fourth (frozen rows keep their best)."""
    f = _failing_map(dtype)
    x0 = torch.zeros(5, 16, dtype=dtype)
    settings = dict(method=method, tol=1e-5 if dtype == torch.float32 else 1e-9, criterion=criterion,
                    min_iter=min_iter, max_iter=60, on_fail="ignore", history=True, check_every=check_every)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, stats = fixed_point(f, x0, return_stats=True, **settings)
        monkeypatch.setattr(driver._NativeJudge, "of", staticmethod(lambda *a, **k: None))
        want, ref = fixed_point(f, x0, return_stats=True, **settings)
    a, b = stats.forward, ref.forward
    assert b.converged[:2].all() and not b.converged[2:4].any(), "the case has failing and converging samples"
    for name in ("iterations", "converged", "diverged", "stopped_at_floor", "best_iterate", "best_at"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    tol = 1e-6 if dtype == torch.float32 else 1e-13  # the norms' sums: in double, and in another order
    for name in ("residual", "best_residual", "halfway", "history"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=tol, atol=0, equal_nan=True, msg=name)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # the same iterates


def test_the_native_judge_is_used_by_a_default_solve_and_not_where_the_kernels_are_off(monkeypatch):
    calls = []
    real = native.judge_step
    monkeypatch.setattr(native, "judge_step", lambda *a: calls.append(1) or real(*a))
    f = _failing_map(torch.float64)
    x0 = torch.zeros(5, 16, dtype=torch.float64)
    fixed_point(f, x0, max_iter=5, on_fail="ignore")
    assert len(calls) == 5
    calls.clear()
    fixed_point(f, x0, max_iter=5, on_fail="ignore", check_every=2)  # the checked loop too
    assert len(calls) == 5
    calls.clear()
    with native.turned_off():
        fixed_point(f, x0, max_iter=5, on_fail="ignore")
        fixed_point(f, x0, max_iter=5, on_fail="ignore", check_every=2)
    assert calls == []


def test_with_more_threads_a_large_state_is_judged_by_the_threaded_tensor_code(monkeypatch):
    monkeypatch.setattr(native, "judge_step", lambda *a: pytest.fail("the kernel ran on a large, threaded state"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x0 = torch.zeros(2, native.ONE_THREAD_VALUES, dtype=torch.float64)
    x = fixed_point(lambda x: 0.5 * x + 1.0, x0, tol=1e-8)
    torch.testing.assert_close(x, torch.full_like(x0, 2.0))


@pytest.mark.parametrize("start", ["transposed", "expanded"])
def test_a_strided_start_gets_the_tensor_codes_record_and_results(monkeypatch, start):
    """The result buffer is a copy of the start: strided where the start is transposed (the tensor code writes the
    results there), contiguous where it is expanded (the kernel does); the iterates after the start are the
    kernel's either way."""
    f = _failing_map(torch.float64)
    x0 = torch.zeros(16, 5, dtype=torch.float64).t() if start == "transposed" else \
        torch.zeros(1, 16, dtype=torch.float64).expand(5, 16)
    settings = dict(method="anderson", m=4, tol=1e-9, max_iter=40, on_fail="ignore")
    calls = []
    real = native.finish_step
    monkeypatch.setattr(native, "finish_step", lambda *a: calls.append(1) or real(*a))
    got, stats = fixed_point(f, x0, return_stats=True, **settings)
    assert bool(calls) == (start == "expanded")
    monkeypatch.setattr(driver._NativeJudge, "of", staticmethod(lambda *a, **k: None))
    want, ref = fixed_point(f, x0, return_stats=True, **settings)
    for name in ("iterations", "converged", "diverged", "best_iterate", "best_at"):
        assert torch.equal(getattr(stats.forward, name), getattr(ref.forward, name)), name
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_a_large_float32_state_is_judged_alike_by_the_kernel_and_the_tensor_code():
    """The tensor code summed float32 squares in float32: a finite state above about 1.8e19 had an infinite norm and
    was judged diverged, where the kernel (sums in double) converged."""
    f = lambda x, z: 0.5 * torch.tanh(x) + z  # noqa: E731
    z = torch.full((2, 4), 1e20)
    outcomes = []
    for off in (False, True):
        with native.turned_off() if off else contextlib.nullcontext():
            x, stats = fixed_point(f, torch.zeros(2, 4), z, return_stats=True, trace=False, on_fail="raise")
        outcomes.append((stats.forward.converged.tolist(), x))
    assert outcomes[0][0] == outcomes[1][0] == [True, True]
    assert torch.equal(outcomes[0][1], outcomes[1][1])
