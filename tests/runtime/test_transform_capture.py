"""A map that reads a transformed tensor besides its arguments (a closure over the tensor a forward-mode AD, vmap or
torch.func.grad is taken with respect to): the tangent, batch and gradient against independent oracles in float64
(central finite differences, a loop over the slices, autograd on the explicit form); a tensor it cannot reach raises
instead of a silently zero tangent or gradient.

Before, such a tensor was not collected (only tensors requiring grad were): forward mode returned a zero tangent
(``torch.func.jvp``) or none (``forward_ad``), silently, and vmap failed."""
import functools

import pytest
import torch
from torch.autograd import forward_ad

from fpidsl.runtime import fixed_point
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


def hidden_solve(z):
    box = (z,)  # a tuple: not searched, so the tensor cannot be made an argument
    return fixed_point(lambda x: torch.tanh(x @ W.T + box[0]), torch.zeros_like(z), **TIGHT)


def test_a_hidden_dual_tensor_raises_under_forward_ad():
    z, v = inputs()
    with forward_ad.dual_level(), pytest.raises(HiddenTensorError, match="carries a forward-mode tangent"):
        hidden_solve(forward_ad.make_dual(z, v))


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
