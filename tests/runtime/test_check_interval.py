"""``check_every = k``: the host reads which samples are done every k iterations, and nothing else changes.

The oracle is the solve with ``check_every = 1`` (a read every iteration; samples leave the moment they are
done): for every sample the result, the record (iterations, outcome, residuals, best iterate, halfway residual,
history) and the gradients are the same with k > 1, on batches whose samples finish at different iterations,
diverge, run out of iterations, stop at the precision floor, or converge at once. The records are compared exactly,
the results to 1e-12 (they are bitwise equal on the CPU: each row's arithmetic does not depend on the others).
"""
from __future__ import annotations

import pytest
import torch

import fpidsl
from fpidsl.errors import FpiError, FpiErrors, SettingsErr, as_list
from fpidsl.frontend.yaml_loader import parse_yaml
from fpidsl.runtime import fixed_point, native
from fpidsl.runtime.correction import fixed_point_states
from fpidsl.runtime.settings import FORWARD_DEFAULTS, SettingsError
from fpidsl.source import Source
from tests.ir.helpers import errors, locate

from .helpers import DTYPE, generator
from .test_host_syncs import HostReads

METHODS = ("picard", "anderson", "broyden")
INTERVALS = (1, 3, 7)
MEMORY = {"picard": {}, "anderson": {"m": 4}, "broyden": {"m": 8}}
RECORD = ("iterations", "converged", "diverged", "stopped_at_floor", "best_iterate", "best_at", "residual",
          "best_residual", "halfway", "history")

# Per sample: the contraction of 0.x * tanh(W x) + z; 0.0 converges at the first evaluation (g(0) = 0). The row
# EXPLODES iterates exp(x) + 1 (no fixed point: Picard and Broyden overflow, Anderson bounces about the minimum
# of its residual and runs out of iterations), the row DRIFTS R x / |x| with R a rotation by one
# radian in three planes (no fixed point, a residual bounded away from zero: it runs out of max_iter with every
# method), the row BREAKS x + 1, NaN beyond 3.5 (every method takes the plain steps of an exact shift: it diverges
# at the fifth evaluation).
SCALES = (0.1, 0.5, 0.9, 0.8, 0.3, 0.0, 0.7, 0.2, 0.4)
EXPLODES, DRIFTS, BREAKS = 4, 3, 8
ROTATION = torch.tensor([[0.5403023058681398, -0.8414709848078965], [0.8414709848078965, 0.5403023058681398]],
                        dtype=DTYPE)


def _problem(seed: int = 0):
    gen = generator(seed)
    W = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=DTYPE))[0]
    scale = torch.tensor(SCALES, dtype=DTYPE).unsqueeze(1)
    explodes, drifts, breaks = torch.zeros(3, len(SCALES), 1, dtype=torch.bool)
    explodes[EXPLODES] = drifts[DRIFTS] = breaks[BREAKS] = True
    z = (torch.randn(len(SCALES), 6, generator=gen, dtype=DTYPE) * (scale > 0)).requires_grad_()
    start = torch.zeros_like(z).index_fill_(0, torch.tensor([DRIFTS]), 1.0)  # R x / |x| is not defined at 0

    def f(x, z):
        turned = (x.reshape(-1, 3, 2) @ ROTATION.T).reshape(-1, 6) / torch.linalg.vector_norm(x, dim=1, keepdim=True)
        contraction = torch.where(drifts, turned, scale * torch.tanh(x @ W.T) + z)
        shifted = torch.where(x.abs() > 3.5, torch.nan, x + 1)
        return torch.where(breaks, shifted, torch.where(explodes, torch.exp(x) + 1, contraction))

    return f, z, start


def _solve(method: str, k: int, **settings):
    f, z, start = _problem()
    options = {"tol": 1e-10, "max_iter": 60, "on_fail": "ignore", **MEMORY[method], **settings}
    x, stats = fixed_point(f, start, z, method=method, check_every=k, history=True,
                           return_stats=True, trace=False, **options)
    return x, stats.forward


def _assert_same_record(stats, reference):
    for name in RECORD:
        torch.testing.assert_close(getattr(stats, name), getattr(reference, name), rtol=0, atol=0, equal_nan=True,
                                   msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_the_batch_finishes_at_different_iterations_in_every_way(method):
    """The oracle's batch covers what the tests below rely on: every outcome, at iterations no interval divides."""
    _, stats = _solve(method, 1)
    finished = stats.iterations.tolist()
    assert finished[SCALES.index(0.0)] == 1  # converged at once
    assert finished[DRIFTS] == 60 and not stats.ok[DRIFTS]  # out of iterations
    assert stats.diverged[BREAKS] and finished[BREAKS] == 5  # NaN: the result is the last finite iterate
    assert stats.best_iterate[EXPLODES] and stats.best_iterate[DRIFTS]
    assert bool(stats.diverged[EXPLODES]) == (method != "anderson")  # Anderson bounces about exp's minimum of f
    assert len(set(finished)) >= 6 and any(n % 3 and n % 7 for n in finished)
    assert int(stats.converged.sum()) == len(SCALES) - 3


@pytest.mark.parametrize("k", INTERVALS[1:])
@pytest.mark.parametrize("method", METHODS)
def test_results_and_records_equal_those_of_a_check_every_iteration(method, k):
    reference, expected = _solve(method, 1)
    x, stats = _solve(method, k)
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-12, equal_nan=True)
    _assert_same_record(stats, expected)
    assert stats.settings.check_every == k


@pytest.mark.parametrize("method", METHODS)
def test_the_record_is_taken_when_found_done_not_at_the_check(method):
    """A map that gives another value at every call (a shift of 1e-9 per call, the same for every row: the running
    rows see the same values whatever the interval): a frozen row evaluated again until the check would show it."""
    f, z, start = _problem()
    results = []
    for k in (1, 7):
        calls = []

        def noisy(x, z):
            calls.append(None)
            return f(x, z) + 1e-9 * len(calls)

        x, stats = fixed_point(noisy, start, z, method=method, check_every=k, history=True, return_stats=True,
                               per_sample=True,  # no mixing probe: its evaluations would count as calls
                               trace=False, tol=1e-8, max_iter=60, on_fail="ignore", **MEMORY[method])
        results.append((x, stats.forward))
    (reference, expected), (x, stats) = results
    assert len(set(expected.iterations.tolist())) >= 6
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-12, equal_nan=True)
    _assert_same_record(stats, expected)


@pytest.mark.parametrize("method", METHODS)
def test_a_frozen_sample_keeps_its_best_iterate_when_evaluated_again(method):
    """The last row's residual is a random vector drawn at each call: 1e-2 long, 1e3 at the fifth call (it
    diverges there; its best iterate is an earlier one), 1e-6 after. Evaluated again while frozen (k = 7: until
    the check at 7), its residual is the lowest yet; its best iterate must stay the one of before."""
    gen = generator(5)
    W = 0.5 * torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=DTYPE))[0]
    z = torch.randn(3, 4, generator=gen, dtype=DTYPE)
    results = []
    for k in (1, 7):
        calls = []

        def f(x, z):
            calls.append(None)
            length = 1e-2 if len(calls) < 5 else 1e3 if len(calls) == 5 else 1e-6
            push = length * torch.nn.functional.normalize(torch.randn(4, generator=generator(len(calls)),
                                                                      dtype=DTYPE), dim=0)
            return torch.cat([torch.tanh(x[:2] @ W.T) + z[:2], x[2:] + push])

        x, stats = fixed_point(f, torch.ones(3, 4, dtype=DTYPE), z, method=method, check_every=k, history=True,
                               per_sample=True,  # no mixing probe: its evaluations would count as calls
                               return_stats=True, trace=False, tol=1e-10, max_iter=60, on_fail="ignore",
                               **MEMORY[method])
        results.append((x, stats.forward))
    (reference, expected), (x, stats) = results
    assert expected.diverged[2] and expected.iterations[2] == 5 and expected.best_iterate[2]
    assert int(expected.best_at[2]) < 5
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-12, equal_nan=True)
    _assert_same_record(stats, expected)


@pytest.mark.parametrize("k", INTERVALS[1:])
@pytest.mark.parametrize("method", METHODS)
def test_samples_at_the_precision_floor_keep_their_record(method, k):
    """tol below float64's resolution: samples stop at the floor (tested every 10 iterations, between checks)."""
    reference, expected = _solve(method, 1, tol=1e-18, max_iter=200)
    assert int(expected.stopped_at_floor.sum()) >= 3
    x, stats = _solve(method, k, tol=1e-18, max_iter=200)
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-12, equal_nan=True)
    _assert_same_record(stats, expected)


@pytest.mark.parametrize("k", (60, 1000))
def test_an_interval_as_long_as_the_solve_reads_only_at_the_end(k):
    reference, expected = _solve("anderson", 1)
    x, stats = _solve("anderson", k)
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-12, equal_nan=True)
    _assert_same_record(stats, expected)


@pytest.mark.parametrize("method", METHODS)
def test_absolute_criterion_and_min_iter(method):
    reference, expected = _solve(method, 1, criterion="absolute", min_iter=5)
    x, stats = _solve(method, 7, criterion="absolute", min_iter=5)
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-12, equal_nan=True)
    _assert_same_record(stats, expected)


def test_a_sample_found_done_between_checks_is_held_fixed():
    """The map sees a frozen sample at the iterate it was found done at, until the next check drops it."""
    scale = torch.tensor([[0.0], [0.5], [0.9]], dtype=DTYPE)
    z = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.5, 2.0]], dtype=DTYPE)
    seen = []

    def f(x, z, scale):
        seen.append(x.clone())
        return scale * torch.tanh(x) + z

    fixed_point(f, torch.ones_like(z), z, scale, check_every=7, tol=1e-10, max_iter=200, trace=False,
                batched=[True, True], per_sample=True)  # no mixing probe: its evaluations would be seen
    # the first sample (g = z = 0) is done at the second evaluation, and frozen at 0 until the check at 7
    assert [len(x) for x in seen[:8]] == [3] * 7 + [2]
    assert torch.equal(seen[0][0], torch.ones(2, dtype=DTYPE))
    assert all(torch.equal(x[0], torch.zeros(2, dtype=DTYPE)) for x in seen[1:7])


@pytest.mark.parametrize("method", METHODS)
def test_intermediate_states_of_the_correction_are_unchanged(method):
    f, z, start = _problem()
    options = {"tol": 1e-10, "max_iter": 60, "on_fail": "ignore", "method": method, **MEMORY[method]}
    with torch.no_grad():
        expected = fixed_point_states(f, start, z, indexing=(2, 5, 9, 20, 41), trace=False, **options)
        states = fixed_point_states(f, start, z, indexing=(2, 5, 9, 20, 41), trace=False,
                                    check_every=3, **options)
    for state, reference in zip(states, expected):
        torch.testing.assert_close(state, reference, rtol=0, atol=1e-12, equal_nan=True)


# ------------------------------------------------------------------------------------------------ gradients


def _small():
    """A contraction on a small batch whose samples finish at different iterations."""
    gen = generator(3)
    W = 0.4 * torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=DTYPE))[0]
    s = torch.tensor([[0.2], [0.9], [0.6], [1.0]], dtype=DTYPE)
    b = torch.randn(4, 3, generator=gen, dtype=DTYPE, requires_grad=True)
    return (lambda x, b: torch.tanh(s * (x @ W.T) + b)), b


@pytest.mark.parametrize("method", METHODS)
def test_gradients_first_and_second_order_equal_those_of_a_check_every_iteration(method):
    f, b = _small()
    weights = torch.linspace(-1, 1, 12, dtype=DTYPE).view(4, 3)

    def derivatives(k):
        settings = {"method": method, "check_every": k, "tol": 1e-13, "max_iter": 300, **MEMORY[method]}
        x = fixed_point(f, torch.zeros(4, 3, dtype=DTYPE), b, backward=settings, trace=False, **settings)
        (grad,) = torch.autograd.grad((weights * x).sum(), b, create_graph=True)
        (second,) = torch.autograd.grad((grad ** 2).sum(), b)
        return x, grad, second

    for got, expected in zip(derivatives(5), derivatives(1)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_and_gradgradcheck_with_a_check_interval(method):
    f, b = _small()
    settings = {"method": method, "check_every": 4, "tol": 1e-13, "max_iter": 300, **MEMORY[method]}

    def solve(b):
        return fixed_point(f, torch.zeros(4, 3, dtype=DTYPE), b, backward=settings, trace=False, **settings)

    assert torch.autograd.gradcheck(solve, (b,), atol=1e-7)
    assert torch.autograd.gradgradcheck(solve, (b,), atol=1e-6)


def test_gmres_takes_no_check_interval_at_run_time():
    """GMRES checks once a cycle: a check_every in its settings is ignored at run time (the spec checker refuses
    it, below), like lam with broyden."""
    f, b = _small()
    grads = []
    for backward in ({"method": "gmres", "tol": 1e-12}, {"method": "gmres", "tol": 1e-12, "check_every": 4}):
        x = fixed_point(f, torch.zeros(4, 3, dtype=DTYPE), b, backward=backward, trace=False, tol=1e-12)
        grads.append(torch.autograd.grad(x.sum(), b)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ host reads


def _reads(method: str, iterations: int, k: int, train: bool) -> int:
    f, b = _small()
    forced = {"min_iter": iterations, "max_iter": iterations, "on_fail": "ignore", "tol": 1e-30, "check_every": k,
              **MEMORY[method]}
    with native.turned_off(), HostReads() as reads:  # the tensor code, as a GPU runs it (test_host_syncs.py)
        x = fixed_point(f, torch.zeros(4, 3, dtype=DTYPE), b, method=method, backward={**forced, "method": method},
                        trace=False, **forced)
        if train:
            x.sum().backward()
    return reads.count


@pytest.mark.parametrize("k", (1, 3, 4))
@pytest.mark.parametrize("method", METHODS)
def test_the_host_reads_once_a_check_interval(method, k):
    """8k forced iterations against 4k: 4k more iterations, 4 more checks (one read each)."""
    assert _reads(method, 8 * k, k, train=False) - _reads(method, 4 * k, k, train=False) == 4


@pytest.mark.parametrize("method", ("picard", "anderson"))
def test_a_training_step_reads_the_host_once_a_check_interval_forward_and_backward(method):
    assert _reads(method, 32, 4, train=True) - _reads(method, 16, 4, train=True) == 2 * 4


@pytest.mark.parametrize("k", (1, 3, 7, 60))
def test_samples_leaving_cost_no_read_beyond_the_check(k):
    """Samples finish at nine different iterations, the last at max_iter (60): the host reads once at each check
    before it (iterations k, 2k, ... below 60), whether samples leave there or not, and at no other time."""
    f, z, start = _problem()
    with native.turned_off(), HostReads() as reads:  # the tensor code, as a GPU runs it
        _, stats = fixed_point(f, start, z, check_every=k, tol=1e-10, max_iter=60, on_fail="ignore", trace=False,
                               return_stats=True, per_sample=True)  # the loop's reads (the probe's: test_mixing)
    assert len(set(stats.forward.iterations.tolist())) == len(SCALES)
    assert reads.count == 59 // k


# ------------------------------------------------------------------------------------------------ compiled specs

SPEC = """layer Mixed {{
  input a : [B, 4]
  input s : [B, 1]
  state x : [B, 4] = zeros
  update x = s * tanh(x) + a
  solve {{ method = {method}, tol = 1e-11, max_iter = 400{solve} }}
  backward {{ tol = 1e-12{backward} }}
}}
"""


@pytest.mark.parametrize("method", METHODS)
def test_a_compiled_layer_reads_check_every_from_its_spec(tmp_path, method):
    def layer(solve: str, backward: str):
        path = tmp_path / f"mixed{len(solve)}.fpi"
        path.write_text(SPEC.format(method=method, solve=solve, backward=backward))
        return fpidsl.load(str(path))()

    checked, plain = layer(", check_every = 3", ", check_every = 5"), layer("", "")
    assert checked.solve_settings.check_every == 3 and checked.backward_settings.check_every == 5
    gen = generator(1)
    a = torch.randn(5, 4, generator=gen, dtype=DTYPE, requires_grad=True)
    s = torch.tensor([[0.1], [0.5], [0.9], [0.0], [0.7]], dtype=DTYPE)
    results = []
    for module in (checked, plain):
        x = module(a, s)
        (grad,) = torch.autograd.grad((x ** 3).sum(), a)
        results.append((x, grad, module.stats.forward, module.stats.backward))
    (x, grad, forward, backward), (x1, grad1, forward1, backward1) = results
    assert forward.settings.check_every == 3 and forward1.settings.check_every == 1
    assert len(set(forward1.iterations.tolist())) >= 4
    torch.testing.assert_close(x, x1, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, grad1, rtol=0, atol=1e-12)
    for name in RECORD[:-1]:
        torch.testing.assert_close(getattr(forward, name), getattr(forward1, name), rtol=0, atol=0,
                                   equal_nan=True, msg=name)
        torch.testing.assert_close(getattr(backward, name), getattr(backward1, name), rtol=0, atol=0,
                                   equal_nan=True, msg=name)


def test_a_yaml_spec_takes_check_every(tmp_path):
    path = tmp_path / "slow.yaml"
    path.write_text('fpi: 1\nlayers:\n  Slow:\n    inputs: {a: "[B, 4]"}\n'
                    '    states: {x: {shape: "[B, 4]", init: zeros}}\n    updates: {x: "0.9 * tanh(x) + a"}\n'
                    '    solve: {check_every: 4}\n    eval: {check_every: 2}\n')
    cls = fpidsl.load(str(path))
    assert (cls.SOLVE, cls.EVAL) == ({"check_every": 4}, {"check_every": 2})
    layer = cls()
    assert layer.solve_settings.check_every == 4 and layer.eval_settings.check_every == 2


# ------------------------------------------------------------------------------------------------ bad settings

BAD_VALUES = [(0, "0"), (-2, "-2"), (2.0, "2.0"), (True, "True"), ("3", "'3'"), (None, "None")]


@pytest.mark.parametrize("value, shown", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_check_every_is_refused_by_the_runtime(value, shown):
    message = f"check_every must be an integer >= 1, got {shown}"
    with pytest.raises(SettingsError) as info:
        FORWARD_DEFAULTS.merged({"check_every": value})
    assert str(info.value) == message
    f, z, start = _problem()
    with pytest.raises(SettingsError) as info:
        fixed_point(f, torch.zeros_like(z), z, check_every=value)
    assert str(info.value) == message
    with pytest.raises(SettingsError) as info:
        fixed_point(f, torch.zeros_like(z), z, backward={"check_every": value})
    assert str(info.value) == message


LAYER = "layer L {{\n  input a : [B, 4]\n  state x : [B, 4]\n  update x = 0.5 * tanh(x) + a\n  {}\n}}\n"
BAD_SPECS = [
    ("solve { check_every = 0 }", "0 }", "check_every must be an integer >= 1, found 0"),
    ("solve { check_every = -3 }", "-3", "check_every must be an integer >= 1, found -3"),
    ("solve { check_every = 2.5 }", "2.5", "check_every must be an integer >= 1, found 2.5"),
    ("backward { check_every = 4.0 }", "4.0", "check_every must be an integer >= 1, found 4.0"),
    ("eval { check_every = 0 }", "0 }", "check_every must be an integer >= 1, found 0"),
    ("backward { method = gmres, check_every = 4 }", "check_every = 4",
     "check_every applies to method = picard, anderson or broyden, but the method is gmres"),
]


@pytest.mark.parametrize("block, anchor, message", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_check_every_in_a_spec_is_an_error_at_its_position(block, anchor, message):
    text = LAYER.format(block)
    (error,) = errors(text)
    assert isinstance(error, SettingsErr)
    assert error.message == message
    assert (error.span.line, error.span.col) == locate(text, anchor)


def test_bad_check_every_in_a_yaml_spec_is_an_error_at_its_position(tmp_path):
    text = ('fpi: 1\nlayers:\n  L:\n    inputs: {a: "[B, 4]"}\n    states: {x: "[B, 4]"}\n'
            '    updates: {x: "0.5 * tanh(x) + a"}\n    solve: {check_every: 0}\n')
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises((FpiError, FpiErrors)) as info:
        fpidsl.load(str(path))
    (error,) = as_list(info.value)
    assert isinstance(error, SettingsErr)
    assert error.message == "check_every must be an integer >= 1, found 0"
    assert (error.span.line, error.span.col) == (7, 26) == locate(text, "0}")
    parse_yaml(Source("bad.yaml", text))  # the YAML itself parses: the checker refuses the value
