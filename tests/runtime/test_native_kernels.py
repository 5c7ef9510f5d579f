"""The native Anderson and Broyden steps (fpidsl/runtime/native) against the solvers' tensor code, and the fallbacks.

The tensor code is the oracle: the same iteration, step by step, on the same inputs, with the kernel turned off on
one copy of the state (``state.kernel = None``). Where the kernel cannot take the tensors, or cannot be built, the
tensor code must run instead and give its own numbers bit for bit.
"""
import os
import shutil
import stat

import pytest
import torch

from fpidsl.runtime import fixed_point, native
from fpidsl.runtime.solvers import anderson as anderson_module
from fpidsl.runtime.solvers.anderson import Anderson
from fpidsl.runtime.solvers.broyden import Broyden

HAS_COMPILER = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "cc", "gcc"))
TURNED_OFF = os.environ.get("FPIDSL_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")
needs_kernel = pytest.mark.skipif(not HAS_COMPILER or TURNED_OFF,
                            reason="the native kernels cannot be built here (no C compiler) or FPIDSL_NATIVE is off")


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The native library looked up again (in a cache directory of the test's own) and forgotten afterwards."""
    monkeypatch.setenv("FPIDSL_CACHE_DIR", str(tmp_path / "cache"))
    native.reset()
    yield tmp_path
    native.reset()


def _problem(batch, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=gen, dtype=dtype) * (0.9 / dim ** 0.5)
    z = torch.randn(batch, dim, generator=gen, dtype=dtype)
    return lambda x: torch.tanh(x @ W) + z


def _iterates(solver, g, x0, steps, use_kernel):
    x, state = x0, solver.init(x0)
    assert (state.kernel is not None) == native.usable(x0) or not use_kernel
    if not use_kernel:
        state.kernel = None
    out = []
    for _ in range(steps):
        gx = g(x)
        x, state = solver.step(x, gx, state, gx - x)
        out.append(x)
    return out, state


@needs_kernel
def test_the_kernels_build_and_are_used_on_the_cpu(fresh_native):
    assert native.status() == "native kernels in use"
    assert list((fresh_native / "cache").glob("fpidsl_native-*")), "the library is cached for the next process"
    assert Anderson(m=5).init(torch.zeros(2, 3)).kernel is not None


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("batch, dim, m, beta, lam", [(8, 4096, 6, 1.0, 1e-4), (32, 159, 5, 1.0, 1e-4),
                                                      (3, 7, 3, 0.5, 1e-2), (2, 1, 4, 0.8, 1e-2),
                                                      (4, 300, 12, 1.0, 1e-6)])
def test_native_steps_match_the_tensor_code(dtype, tol, batch, dim, m, beta, lam):
    """Iterate by iterate through the ring's first fill and wrap-around (3 m steps), and the state alike. (A
    singular system, lam = 0 with more differences than dimensions, is solved by either code to rounding noise:
    the two need not agree there, so every case is regularised.)"""
    g = _problem(batch, dim, dtype)
    solver = Anderson(m=m, beta=beta, lam=lam)
    x0 = torch.zeros(batch, dim, dtype=dtype)
    steps = min(3 * m, 12) if dim > 1 else 3 * m
    fast, s_fast = _iterates(solver, g, x0, steps, True)
    slow, s_slow = _iterates(solver, g, x0, steps, False)
    for n, (a, b) in enumerate(zip(fast, slow)):
        assert torch.isfinite(a).all()
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert err <= tol * (n + 1), f"iterate {n + 1}: relative difference {err:.3g}"
    assert (s_fast.slot, s_fast.filled) == (s_slow.slot, s_slow.filled)
    k = s_fast.filled  # only the filled slots are ever written or read
    scale = float(slow[-1].abs().max())  # the differences cancel: their error is the iterates' error
    assert torch.allclose(s_fast.dF[:, :k], s_slow.dF[:, :k], rtol=0, atol=tol * steps * scale)
    assert torch.allclose(s_fast.dH[:, :k], s_slow.dH[:, :k], rtol=0, atol=tol * steps * scale)
    # the Gram matrix the kernel keeps is the Gram matrix of the differences it wrote
    dF = s_fast.dF[:, :k].double()
    gram = dF @ dF.transpose(1, 2)
    assert torch.allclose(s_fast.gram[:, :k, :k].double(), gram, rtol=0, atol=tol * float(gram.abs().max()))


@needs_kernel
def test_steps_that_switch_between_kernel_and_tensor_code_keep_one_iteration():
    """A map whose output is sometimes not contiguous: those steps (and the next, whose held residual is that
    output) run the tensor code, the others the kernel, on one ring; the iterates are the tensor code's."""
    g = _problem(4, 50, torch.float64)

    def sometimes_strided(x, n):
        y = g(x)
        return y.t().contiguous().t() if n % 3 == 1 else y

    solver = Anderson(m=4)
    iterates = {}
    for use_kernel in (True, False):
        x = torch.zeros(4, 50, dtype=torch.float64)
        state = solver.init(x)
        if not use_kernel:
            state.kernel = None
        iterates[use_kernel] = []
        for n in range(12):
            gx = sometimes_strided(x, n)
            x, state = solver.step(x, gx, state, gx - x)
            iterates[use_kernel].append(x)
    for a, b in zip(iterates[True], iterates[False]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@needs_kernel
def test_native_plain_step_on_a_singular_system_as_the_tensor_code():
    """The tensor code's test_anderson_falls_back_to_the_plain_step_on_a_singular_system, through the kernel."""
    solver = Anderson(m=3, beta=0.5, lam=0.0)
    x = torch.zeros(2, 3, dtype=torch.float64)
    state = solver.init(x)
    assert state.kernel is not None
    g = torch.ones(2, 3, dtype=torch.float64)
    x1, state = solver.step(x, g, state)
    x2, state = solver.step(x1, x1 + (g - x), state)  # dF = 0: Gram zero, lam = 0: the system is singular
    assert torch.equal(x2, x1 + 0.5 * (g - x))


@needs_kernel
def test_native_bad_sample_takes_the_plain_step_and_leaves_the_others_alone():
    g = _problem(3, 5, torch.float64)
    solver = Anderson(m=3)
    x = torch.zeros(3, 5, dtype=torch.float64)
    ref, _ = _iterates(solver, g, x, 4, False)
    state = solver.init(x)
    for n in range(4):
        gx = g(x)
        if n == 3:
            gx[1, 2] = float("nan")  # sample 1's residual is not finite: its mix is rejected
        x_next, state = solver.step(x, gx, state, gx - x)
        if n == 3:
            assert torch.equal(x_next[1].isnan(), gx[1].isnan())  # the plain step, g itself (beta = 1)
            assert torch.equal(x_next[1, :2], gx[1, :2])
            for i in (0, 2):
                assert torch.allclose(x_next[i], ref[3][i], rtol=1e-12, atol=1e-14)
        x = x_next


@needs_kernel
@pytest.mark.parametrize("method, m, size, switch", [("anderson", 5, 20, "environment"),
                                                     ("broyden", 8, 30, "turned_off")])
def test_whole_solves_agree_with_the_tensor_code(monkeypatch, method, m, size, switch):
    """fixed_point, kernel on and off (FPIDSL_NATIVE=0, or native.turned_off()): the same iteration counts, results
    and gradients."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(3)
    W = (torch.randn(size, size, generator=gen, dtype=dtype) * 0.25).requires_grad_()
    z = torch.randn(6, size, generator=gen, dtype=dtype, requires_grad=True)

    def solve():
        x, stats = fixed_point(lambda x, z, W: torch.tanh(x @ W) + z, torch.zeros(6, size, dtype=dtype), z, W,
                               method=method, m=m, tol=1e-11, backward={"method": method, "m": m, "tol": 1e-11},
                               return_stats=True)
        return x, stats, torch.autograd.grad(x.square().sum(), (z, W))

    x_fast, stats_fast, grads_fast = solve()
    if switch == "turned_off":
        with native.turned_off():
            x_slow, stats_slow, grads_slow = solve()
    else:
        monkeypatch.setenv("FPIDSL_NATIVE", "0")
        native.reset()
        try:
            assert native.status() == "native kernels not in use: FPIDSL_NATIVE is off"
            x_slow, stats_slow, grads_slow = solve()
        finally:
            monkeypatch.delenv("FPIDSL_NATIVE")
            native.reset()
    assert torch.equal(stats_fast.forward.iterations, stats_slow.forward.iterations)
    assert torch.equal(stats_fast.backward.iterations, stats_slow.backward.iterations)
    assert torch.allclose(x_fast, x_slow, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_fast, grads_slow):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def _forbid_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the native kernel was called")
    monkeypatch.setattr(native, "anderson_step", refuse)


@pytest.mark.parametrize("case", ["non-contiguous", "bfloat16", "too-long memory"])
def test_the_tensor_code_runs_where_the_kernel_cannot(monkeypatch, case):
    _forbid_kernel(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    if case == "non-contiguous":
        solver, x = Anderson(m=3), torch.zeros(4, 5)
        g = torch.randn(5, 4, generator=gen).t()  # (4, 5), not contiguous
        state = solver.init(x)
        for _ in range(4):
            x, state = solver.step(x, g, state)
        assert torch.isfinite(x).all()
    elif case == "bfloat16":
        solver, x = Anderson(m=3), torch.zeros(4, 5, dtype=torch.bfloat16)
        state = solver.init(x)
        assert state.kernel is None
    else:
        state = Anderson(m=native.max_m() + 1 if native.max_m() else 65).init(torch.zeros(2, 3))
        assert state.kernel is None


def test_vmap_over_an_anderson_layer_matches_the_loop():
    """fixed_point's vmap rule solves the stacked batch with plain tensors (the kernel may take them); whichever
    code runs, the vmapped solve is the per-sample one."""
    z = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def one(z):
        return fixed_point(lambda x, z: 0.5 * torch.tanh(x) + z, torch.zeros_like(z), z, method="anderson", m=3,
                           tol=1e-12)

    batched = torch.func.vmap(one)(z)
    looped = torch.stack([one(zi) for zi in z])
    assert torch.allclose(batched, looped, rtol=1e-10, atol=1e-12)


def test_a_failing_compiler_leaves_the_tensor_code_in_use(monkeypatch, fresh_native):
    broken = fresh_native / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'no such compiler here' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.delenv("FPIDSL_NATIVE", raising=False)  # the compiler's failure, not the switch
    assert native.library() is None
    assert native.status().startswith("native kernels not in use:")
    assert "no such compiler here" in native.status()
    state = Anderson(m=3).init(torch.zeros(2, 4, dtype=torch.float64))
    assert state.kernel is None
    x = fixed_point(lambda x: 0.5 * torch.cos(x), torch.zeros(2, 4, dtype=torch.float64), method="anderson", m=3,
                    tol=1e-12)
    assert torch.allclose(x, 0.5 * torch.cos(x), atol=1e-11)
    assert not list((fresh_native / "cache").glob("*.part")), "no half-built file is left behind"


@needs_kernel
def test_turned_off_runs_the_tensor_code_inside_the_block_only(monkeypatch):
    with native.turned_off():
        assert native.library() is None
        assert native.status() == "native kernels not in use: turned off by fpidsl.runtime.native.turned_off()"
        assert Anderson(m=3).init(torch.zeros(2, 4)).kernel is None
    assert Anderson(m=3).init(torch.zeros(2, 4)).kernel is not None


def test_the_module_names_the_kernels_source():
    assert all(p.is_file() for p in native.SOURCES + native.HEADERS)
    assert anderson_module.native is native


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("batch, dim, m", [(8, 4096, 50), (2, 1500, 9), (32, 159, 20), (3, 7, 4), (4, 30, 5)])
def test_native_broyden_steps_match_the_tensor_code(dtype, tol, batch, dim, m):
    """Iterate by iterate, through restarts of a full memory where 15 steps fill it (m = 4, 5)."""
    g = _problem(batch, dim, dtype)
    solver = Broyden(m=m)
    x0 = torch.zeros(batch, dim, dtype=dtype)
    fast, s_fast = _iterates(solver, g, x0, 15, True)
    slow, s_slow = _iterates(solver, g, x0, 15, False)
    for n, (a, b) in enumerate(zip(fast, slow)):
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert err <= tol * (n + 1), f"iterate {n + 1}: relative difference {err:.3g}"
    assert (s_fast.slot, s_fast.filled) == (s_slow.slot, s_slow.filled)
    if dtype != torch.float64:  # near convergence u = w / (v . df) divides rounding noise by a small number
        return
    # the buffers after 9 steps (through a restart where m is 4 or 5): by step 15 the smallest problems have
    # converged to rounding level, and their last updates are that noise divided by v . df
    _, s_fast = _iterates(solver, g, x0, 9, True)
    _, s_slow = _iterates(solver, g, x0, 9, False)
    k = s_fast.filled
    assert k == s_slow.filled
    for fast_buffer, slow_buffer in ((s_fast.U, s_slow.U), (s_fast.S, s_slow.S), (s_fast.R, s_slow.R)):
        scale = float(slow_buffer[:, :k].abs().max())
        assert torch.allclose(fast_buffer[:, :k], slow_buffer[:, :k], rtol=0, atol=1e3 * tol * scale)


@needs_kernel
def test_native_broyden_keeps_h_where_the_update_is_not_finite_and_falls_back_to_g():
    """A zero step (x = x_prev, so v = 0 and v . df = 0) gives a non-finite update: zeros in the slot, H kept;
    a non-finite proposal gives g itself, per sample, like the tensor code."""
    dtype = torch.float64
    for use_kernel in (True, False):
        solver = Broyden(m=4)
        x = torch.zeros(2, 3, dtype=dtype)
        state = solver.init(x)
        if not use_kernel:
            state.kernel = None
        g = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], dtype=dtype)
        x1, state = solver.step(x, g, state)
        assert torch.equal(x1, g)
        x2, state = solver.step(x, g, state)  # the same point again: dx = 0
        assert state.filled == 1 and torch.equal(state.U[:, 0], torch.zeros(2, 3, dtype=dtype))
        assert torch.equal(state.S[:, 0], torch.zeros(2, 3, dtype=dtype))
        assert torch.equal(state.R[:, 0], torch.zeros(2, 4, dtype=dtype))
        assert torch.equal(x2, g)  # H = -I still: the Picard step
        bad = g.clone()
        bad[0, 1] = float("inf")
        x3, state = solver.step(x2, bad, state)
        assert torch.equal(x3[0], bad[0])  # not finite: g itself
        assert torch.isfinite(x3[1]).all()


def test_the_tensor_code_runs_where_the_broyden_kernel_cannot(monkeypatch):
    monkeypatch.setattr(native, "broyden_step", lambda *a, **k: (_ for _ in ()).throw(AssertionError("called")))
    solver = Broyden(m=3)
    assert solver.init(torch.zeros(2, 3, dtype=torch.bfloat16)).kernel is None
    x = torch.zeros(4, 5)
    state = solver.init(x)
    g = torch.randn(5, 4, generator=torch.Generator().manual_seed(2)).t()  # not contiguous
    for _ in range(4):
        x, state = solver.step(x, g, state)
    assert torch.isfinite(x).all()


@needs_kernel
@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_forward_and_second_order_derivatives_through_the_kernels_match_the_closed_form(method):
    """x = A x + B z: x = (I - A)^-1 B z, so the JVP along v is (I - A)^-1 B v and the gradient of
    |x|^2 / 2 is B^T (I - A)^-T x; the derivatives come from solves that run the kernel (the tangent and adjoint
    solves take the backward settings)."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(11)
    n = 12
    A = 0.8 * torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))[0]
    B = torch.randn(n, n, generator=gen, dtype=dtype)
    z = torch.randn(3, n, generator=gen, dtype=dtype)
    v = torch.randn(3, n, generator=gen, dtype=dtype)
    solve_matrix = torch.linalg.inv(torch.eye(n, dtype=dtype) - A)

    def layer(z):
        settings = {"method": method, "m": 6, "tol": 1e-13, "max_iter": 500}
        return fixed_point(lambda x, z: x @ A.T + z @ B.T, torch.zeros_like(z), z, backward=settings, **settings)

    assert Anderson(m=6).init(z).kernel is not None
    _, tangent = torch.func.jvp(layer, (z,), (v,))
    assert torch.allclose(tangent, v @ B.T @ solve_matrix.T, rtol=1e-9, atol=1e-10)
    zr = z.clone().requires_grad_()
    x = layer(zr)
    (grad,) = torch.autograd.grad(0.5 * x.square().sum(), zr, create_graph=True)
    want = (z @ B.T @ solve_matrix.T) @ solve_matrix @ B
    assert torch.allclose(grad, want, rtol=1e-9, atol=1e-10)
    (second,) = torch.autograd.grad(grad, zr, v)  # the Hessian of |x|^2 / 2 is M^T M, M = (I - A)^-1 B
    M = solve_matrix @ B
    assert torch.allclose(second, v @ (M.T @ M).T, rtol=1e-8, atol=1e-9)


@needs_kernel
def test_with_more_threads_a_large_state_runs_the_threaded_tensor_code(monkeypatch):
    _forbid_kernel(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        large = torch.zeros(2, native.ONE_THREAD_VALUES // 2 + 1)
        x, state = large, Anderson(m=3).init(large)
        for _ in range(3):
            x, state = Anderson(m=3).step(x, 0.5 * x + 1, state)
        assert not native.worth(large) and native.worth(torch.zeros(2, 8))
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(1)
    try:
        assert native.worth(large)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_a_cache_directory_others_may_write_is_not_used(monkeypatch, fresh_native):
    shared = fresh_native / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("FPIDSL_CACHE_DIR", str(shared))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(fresh_native / "tmp"))
    assert native.library() is not None  # built in the private fallback, not in the shared directory
    assert not list(shared.iterdir())
    assert list((fresh_native / "tmp").glob("fpidsl-*/fpidsl_native-*"))
    native.reset()
    (fresh_native / "tmp").chmod(0o777)
    private = next((fresh_native / "tmp").glob("fpidsl-*"))
    private.chmod(0o777)
    assert native.library() is None
    assert "writable by others" in native.status()
