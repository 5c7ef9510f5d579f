"""A map that reads a transformed tensor besides its arguments (a closure over the tensor a forward-mode AD, vmap or
torch.func.grad is taken with respect to): the tangent, batch and gradient against independent oracles in float64
(central finite differences, a loop over the slices, autograd on the explicit form); a tensor it cannot reach raises
instead of a silently zero tangent or gradient.

Before, such a tensor was not collected (only tensors requiring grad were): forward mode returned a zero tangent
(``torch.func.jvp``) or none (``forward_ad``), silently, and vmap failed."""
import contextlib
import functools

import pytest
import torch
from torch.autograd import forward_ad

from fpidsl.runtime import fixed_point, native
from fpidsl.runtime.capture import HiddenTensorError, discover, varies

from .helpers import DTYPE, TIGHT, TIGHT_BACKWARD, generator, rel_err

W = 0.4 * torch.randn(5, 5, generator=generator(3), dtype=DTYPE)


def closure_solve(z):
    """The fixed point of ``x = tanh(x W^T + z)``, ``z`` read from the closure."""
    return fixed_point(lambda x: torch.tanh(x @ W.T + z), torch.zeros_like(z), backward=TIGHT_BACKWARD, **TIGHT)


def explicit_solve(z):
    return fixed_point(lambda x, z: torch.tanh(x @ W.T + z), torch.zeros_like(z), z, backward=TIGHT_BACKWARD,
                       **TIGHT)


def inputs():
    gen = generator(5)
    return torch.randn(4, 5, generator=gen, dtype=DTYPE), torch.randn(4, 5, generator=gen, dtype=DTYPE)


def finite_difference(solve, z, v, eps=1e-6):
    with torch.no_grad():
        return (solve(z + eps * v) - solve(z - eps * v)) / (2 * eps)


def test_forward_ad_tangent_through_a_closure_matches_finite_differences():
    z, v = inputs()
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(closure_solve(forward_ad.make_dual(z, v))).tangent
    assert tangent is not None
    assert rel_err(tangent, finite_difference(closure_solve, z, v)) < 1e-7


def test_func_jvp_and_jacfwd_through_a_closure_match_finite_differences_and_the_explicit_form():
    z, v = inputs()
    _, tangent = torch.func.jvp(closure_solve, (z,), (v,))
    assert rel_err(tangent, finite_difference(closure_solve, z, v)) < 1e-7
    assert rel_err(tangent, torch.func.jvp(explicit_solve, (z,), (v,))[1]) < 1e-12
    jac = torch.func.jacfwd(lambda z: closure_solve(z).sum(0))(z)
    assert rel_err(jac, torch.func.jacfwd(lambda z: explicit_solve(z).sum(0))(z)) < 1e-12


def test_vmap_over_a_closure_matches_a_loop_over_the_slices():
    z, _ = inputs()
    batch = torch.stack([z, 0.5 * z, -z])
    looped = torch.stack([closure_solve(s) for s in batch])
    assert rel_err(torch.func.vmap(closure_solve)(batch), looped) < 1e-12


def test_func_grad_and_vmap_of_grad_through_a_closure_match_autograd():
    z, _ = inputs()

    def loss(z):
        return closure_solve(z).sin().sum()

    zz = z.clone().requires_grad_()
    (want,) = torch.autograd.grad(explicit_solve(zz).sin().sum(), zz)
    assert rel_err(torch.func.grad(loss)(z), want) < 1e-10
    batch = torch.stack([z, -z])
    wants = []
    for s in batch:
        ss = s.clone().requires_grad_()
        wants.append(torch.autograd.grad(explicit_solve(ss).sin().sum(), ss)[0])
    assert rel_err(torch.func.vmap(torch.func.grad(loss))(batch), torch.stack(wants)) < 1e-10


def test_a_partial_argument_carrying_a_tangent_is_collected():
    z, v = inputs()

    def g(x, z):
        return torch.tanh(x @ W.T + z)

    def solve(z):
        return fixed_point(functools.partial(g, z=z), torch.zeros_like(z), backward=TIGHT_BACKWARD, **TIGHT)

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(z, v)
        assert varies(dual) and not varies(z)
        assert len(discover(functools.partial(g, z=dual)).tensors) == 1
        tangent = forward_ad.unpack_dual(solve(dual)).tangent
    assert rel_err(tangent, finite_difference(solve, z, v)) < 1e-7


def hidden_solve(z, **settings):
    box = (z,)  # a tuple: not searched, so the tensor cannot be made an argument
    return fixed_point(lambda x: torch.tanh(x @ W.T + box[0]), torch.zeros_like(z), **{**TIGHT, **settings})


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
@pytest.mark.parametrize("kernels", [True, False])
def test_a_hidden_dual_tensor_raises_under_forward_ad(method, kernels):
    """With the native kernels and with the tensor code (a GPU's path), whose ``out=`` writes have no forward-mode
    rule: the solve runs on primal values, and the check names the tensor."""
    z, v = inputs()
    with contextlib.ExitStack() as stack:
        if not kernels:
            stack.enter_context(native.turned_off())
        with forward_ad.dual_level(), pytest.raises(HiddenTensorError, match="carries a forward-mode tangent"):
            hidden_solve(forward_ad.make_dual(z, v), method=method)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_a_hidden_tensor_raises_under_torch_func_forward_mode(transform):
    z, v = inputs()
    with pytest.raises(HiddenTensorError, match="carries a forward-mode tangent"):
        if transform == "jvp":
            torch.func.jvp(hidden_solve, (z,), (v,))
        else:
            torch.func.jacfwd(lambda z: hidden_solve(z).sum(0))(z)


def test_a_hidden_tensor_raises_under_torch_func_grad():
    z, _ = inputs()
    with pytest.raises(HiddenTensorError, match="torch.func.grad tracks"):
        torch.func.grad(lambda z: hidden_solve(z).sin().sum())(z)


def test_a_hidden_tensor_under_vmap_is_an_error_not_a_result():
    z, _ = inputs()
    with pytest.raises(RuntimeError):
        torch.func.vmap(hidden_solve)(torch.stack([z, -z]))


# ---------------------------------------------------------------------------------------------------------------
# The usual DEQ module: forward calls fixed_point on a closure over its own cell; the parameters come in through
# torch.func.functional_call (wrapped or dual), the oracle is the same module unrolled (200 steps of a map of
# contraction below 0.4: converged to rounding).


class Cell(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(5, 5).to(DTYPE)
        with torch.no_grad():
            self.lin.weight.mul_(0.3)

    def forward(self, x, z):
        return torch.tanh(self.lin(x) + z)


class DEQ(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.cell = Cell(seed)

    def forward(self, z):
        return fixed_point(lambda x: self.cell(x, z), torch.zeros_like(z), backward=TIGHT_BACKWARD, **TIGHT)


class Unrolled(DEQ):
    def forward(self, z):
        x = torch.zeros_like(z)
        for _ in range(200):
            x = self.cell(x, z)
        return x


def deq_and_oracle():
    deq, oracle = DEQ(), Unrolled()
    oracle.load_state_dict(deq.state_dict())
    params = {k: v.detach() for k, v in deq.named_parameters()}
    gen = generator(9)
    tangents = {k: torch.randn(v.shape, generator=gen, dtype=DTYPE) for k, v in params.items()}
    return deq, oracle, params, tangents, inputs()[0]


def test_jvp_with_respect_to_a_modules_parameters_through_functional_call_matches_unrolled():
    from torch.func import functional_call

    deq, oracle, params, tangents, z = deq_and_oracle()
    got = torch.func.jvp(lambda p: functional_call(deq, p, (z,)), (params,), (tangents,))[1]
    want = torch.func.jvp(lambda p: functional_call(oracle, p, (z,)), (params,), (tangents,))[1]
    assert rel_err(got, want) < 1e-12  # was a zero tangent (relative error 1.0)
    with forward_ad.dual_level():
        dual = {k: forward_ad.make_dual(v, tangents[k]) for k, v in params.items()}
        got = forward_ad.unpack_dual(functional_call(deq, dual, (z,))).tangent  # was None
        want = forward_ad.unpack_dual(functional_call(oracle, dual, (z,))).tangent
    assert got is not None and rel_err(got, want) < 1e-12


def test_vmap_over_stacked_module_states_matches_each_model_alone():
    from torch.func import functional_call, stack_module_state

    models = [DEQ(seed) for seed in range(3)]
    params, buffers = stack_module_state(models)
    base = DEQ(0).to("meta")
    z = inputs()[0]
    got = torch.func.vmap(lambda p, b: functional_call(base, (p, b), (z,)))(params, buffers)  # was an error
    assert rel_err(got, torch.stack([m(z) for m in models])) < 1e-12


@pytest.mark.parametrize("trace", [True, False])
def test_a_plain_start_with_a_closure_over_a_dual_tensor_gets_its_tangent(trace):
    """The start is no dual (the trace front-end is asked first, trace=True): the tangent still comes through."""
    z, v = inputs()

    def solve(z):
        return fixed_point(lambda x: torch.tanh(x @ W.T + z), torch.zeros(4, 5, dtype=DTYPE), trace=trace,
                           backward=TIGHT_BACKWARD, **TIGHT)

    want = finite_difference(solve, z, v)
    assert rel_err(torch.func.jvp(solve, (z,), (v,))[1], want) < 1e-7
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(solve(forward_ad.make_dual(z, v))).tangent
    assert tangent is not None and rel_err(tangent, want) < 1e-7


def test_batched_gradients_raise_a_clear_error_and_the_alternatives_work():
    """torch's legacy vmap (is_grads_batched, vectorize=True) cannot run the backward's solve: a clear error that
    names what works instead; torch.func.jacrev and vectorize=False give the Jacobian."""
    z, _ = inputs()
    with pytest.raises(RuntimeError, match="cannot take batched gradients.*torch.func.jacrev"):
        torch.autograd.functional.jacobian(explicit_solve, z, vectorize=True)
    want = torch.autograd.functional.jacobian(explicit_solve, z)
    assert rel_err(torch.func.jacrev(explicit_solve)(z), want) < 1e-12
    zz = z.clone().requires_grad_()
    x = explicit_solve(zz)
    rows = torch.eye(x.numel(), dtype=x.dtype).reshape(-1, *x.shape)
    with pytest.raises(RuntimeError, match="cannot take batched gradients"):
        torch.autograd.grad(x, zz, rows, is_grads_batched=True)


def test_vmap_over_a_closure_over_an_index_tensor_matches_a_loop():
    """A vmapped tensor of any dtype is collected: an index tensor read from the closure is sliced like the rest."""
    z, _ = inputs()
    picks = torch.tensor([[0, 1], [2, 3], [4, 0]])

    def solve(i):
        return fixed_point(lambda x: torch.tanh(x @ W.T + z + 0.1 * x[..., i].sum(-1, keepdim=True)),
                           torch.zeros_like(z), **TIGHT)

    assert rel_err(torch.func.vmap(solve)(picks), torch.stack([solve(i) for i in picks])) < 1e-12
