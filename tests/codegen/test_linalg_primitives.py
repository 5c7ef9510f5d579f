"""Issue 13's linear algebra in compiled layers: solve(A, b), einsum("equation", ...), a ** b with a tensor exponent,
arange(n) and spmm(A, x) with a sparse input. Each form compiles, its fixed point matches a torch oracle (a closed
form or plain iteration with dense torch operations), its first and second derivatives match autograd through the
unrolled iteration, and gradcheck / gradgradcheck pass, all in float64. Mistakes are one positioned error; a sparse
input's call-time mistakes are a LayerInputError naming the input."""
from __future__ import annotations

import pytest
import torch

import fpidsl
from fpidsl.compiler import check_source
from fpidsl.errors import ShapeErr, TypeErr
from fpidsl.runtime.layer import LayerInputError
from fpidsl.source import Source
from fpidsl.tools.yaml_convert import convert

from ..runtime.helpers import derivatives
from .helpers import ONE_STATE_SPEC, TIGHT, assert_body_matches_unrolled_autograd, the_one_error

F64 = torch.float64
CSR_BETA = "ignore:Sparse CSR tensor support is in beta state:UserWarning"

BODIES = {
    "power": "(1.5 + sigmoid(a)) ** h",
    "power-number-base": "2 ** h - 1",
    "arange": "h + 0.1 * arange(4)",
    "solve-vectors": "solve(3 * eye(4) + 0.2 * unsqueeze(a, -1) * unsqueeze(a, 1), h)",
    "solve-matrices": "reshape(solve(2 * eye(2) + 0.2 * reshape(tanh(a), [B, 2, 2]), reshape(h, [B, 2, 2])), [B, 4])",
    "einsum-contraction": 'einsum("bi,ij->bj", h, 0.3 * eye(4) + 0.1)',
    "einsum-outer-summed": 'sum(einsum("bi,bj->bij", h, tanh(a)), dim=2)',
    "einsum-lonely-letter": 'h * unsqueeze(einsum("bi->b", a), -1)',
    "einsum-ellipsis": 'einsum("...i,ij->...j", h, 0.5 * eye(4))',
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BODIES))
def test_a_layer_with_the_form_matches_unrolled_autograd(name, tmp_path):
    assert_body_matches_unrolled_autograd(BODIES[name], tmp_path)


def _load(text: str, tmp_path, name: str = "t.fpi"):
    spec = tmp_path / name
    spec.write_text(text)
    return fpidsl.load(spec)


LINEAR_SOLVE = """
layer S {
  input a : [B, 3]
  input M : [B, 3, 3]
  state x : [B, 3]
  update x = 0.5 * solve(M, x) + a
}
"""


def test_solve_in_a_linear_layer_matches_the_closed_form(tmp_path):
    """x = 0.5 M⁻¹ x + a has x̂ = (I - 0.5 M⁻¹)⁻¹ a; gradcheck and gradgradcheck in a and M (per-sample M)."""
    layer = _load(LINEAR_SOLVE, tmp_path)(solve=TIGHT, backward=TIGHT).double()
    torch.manual_seed(0)
    a = torch.randn(2, 3, dtype=F64, requires_grad=True)
    M = (2 * torch.eye(3, dtype=F64) + 0.3 * torch.randn(2, 3, 3, dtype=F64)).requires_grad_()
    closed = torch.linalg.solve(torch.eye(3, dtype=F64) - 0.5 * torch.linalg.inv(M), a.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(layer(a, M), closed, rtol=1e-10, atol=1e-12)
    assert type(layer).SAMPLEWISE  # one M per sample: samples never mix
    assert torch.autograd.gradcheck(layer, (a, M))
    assert torch.autograd.gradgradcheck(layer, (a, M), fast_mode=True)  # the full one: 7 s for these 24 inputs


def test_solve_in_a_linear_layer_is_exact_to_third_order(tmp_path):
    """The derivatives of a loss of x̂ = (I - 0.5 M⁻¹)⁻¹ a in a and M, orders 1 to 3, equal the closed form's."""
    layer = _load(LINEAR_SOLVE, tmp_path)(solve=TIGHT, backward=TIGHT).double()
    torch.manual_seed(0)
    a = torch.randn(2, 3, dtype=F64, requires_grad=True)
    M = (2 * torch.eye(3, dtype=F64) + 0.3 * torch.randn(2, 3, 3, dtype=F64)).requires_grad_()
    weight = torch.randn(2, 3, dtype=F64)

    def closed():
        return torch.linalg.solve(torch.eye(3, dtype=F64) - 0.5 * torch.linalg.inv(M), a.unsqueeze(-1)).squeeze(-1)

    got = derivatives(lambda: ((weight * layer(a, M)).sum()) ** 2, [a, M], order=3)
    want = derivatives(lambda: ((weight * closed()).sum()) ** 2, [a, M], order=3)
    for g_order, w_order in zip(got, want):
        for g, w in zip(g_order, w_order):
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


EINSUM_LINEAR = """
layer E {
  input a : [B, 4]
  state x : [B, 4]
  param W : tensor [4, 4] = normal(0, 0.2)
  update x = einsum("bi,ij->bj", x, W) + a
}
"""


def test_einsum_in_a_linear_layer_matches_the_closed_form(tmp_path):
    """x = x W + a has x̂ = a (I - W)⁻¹; derivatives of order 1 and 2 in a and W match the closed form's."""
    torch.manual_seed(1)
    layer = _load(EINSUM_LINEAR, tmp_path)(solve=TIGHT, backward=TIGHT).double()
    assert type(layer).SAMPLEWISE
    a = torch.randn(3, 4, dtype=F64, requires_grad=True)
    weight = torch.randn(3, 4, dtype=F64)

    def closed():
        return torch.linalg.solve((torch.eye(4, dtype=F64) - layer.W).T, a.T).T

    torch.testing.assert_close(layer(a), closed(), rtol=1e-10, atol=1e-12)
    params = [a, layer.W]
    got = derivatives(lambda: (weight * layer(a)).sum() ** 2, params, order=2)
    want = derivatives(lambda: (weight * closed()).sum() ** 2, params, order=2)
    for g_order, w_order in zip(got, want):
        for g, w in zip(g_order, w_order):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_einsum_sums_over_a_batch_letter_and_is_solved_jointly(tmp_path):
    """A letter that carries the batch and is summed over mixes the samples (MIXED): the layer is not samplewise,
    and its fixed point equals plain iteration of the whole batch."""
    text = EINSUM_LINEAR.replace('einsum("bi,ij->bj", x, W) + a', '0.1 * einsum("bi,bj->j", x, a) + a')
    layer = _load(text, tmp_path)(solve=TIGHT, backward=TIGHT).double()
    assert not type(layer).SAMPLEWISE
    a = 0.5 * torch.randn(3, 4, dtype=F64)
    x = torch.zeros_like(a)
    for _ in range(200):
        x = 0.1 * torch.einsum("bi,bj->j", x, a) + a
    torch.testing.assert_close(layer(a), x, rtol=1e-10, atol=1e-12)


IGNN = """
layer IGNN {
  input A : sparse [N, N]
  input u : [N, 4]
  state x : [N, 4]
  param W : tensor [4, 4] = normal(0, 0.3)
  update x = tanh(spmm(A, x @ W) + u)
}
"""


def _graph(n: int = 8, seed: int = 0) -> torch.Tensor:
    """A random sparse adjacency (about 30% of the entries) scaled so that its rows sum to at most 1/2 in
    absolute value: the IGNN map is then a contraction for ||W|| < 2."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, n, generator=gen, dtype=F64)
    dense = torch.where(torch.rand(n, n, generator=gen) < 0.3, dense, torch.zeros_like(dense))
    return 0.5 * dense / (dense.abs().sum(1, keepdim=True) + 1e-3)


def _dense_iteration(dense, u, W, steps: int = 200):
    x = torch.zeros_like(u)
    for _ in range(steps):
        x = torch.tanh(dense @ (x @ W) + u)
    return x


@pytest.mark.filterwarnings(CSR_BETA)
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_ignn_on_one_sparse_graph_matches_dense_iteration(layout, tmp_path):
    """The node axis N is the batch, and spmm mixes rows: the layer is solved jointly (not samplewise). Its fixed
    point, and its first and second derivatives in u and W, match dense plain iteration; the gradient of a
    single node's output reaches every node it depends on (no node is frozen as 'finished' early)."""
    torch.manual_seed(2)
    layer = _load(IGNN, tmp_path)(solve=TIGHT, backward=TIGHT).double()
    assert not type(layer).SAMPLEWISE
    dense = _graph()
    A = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    u = torch.randn(8, 4, dtype=F64, requires_grad=True)
    torch.testing.assert_close(layer(A, u), _dense_iteration(dense, u, layer.W), rtol=1e-10, atol=1e-12)
    params = [u, layer.W]
    got = derivatives(lambda: layer(A, u)[0, 0] + (layer(A, u) ** 2).sum(), params, order=2)
    want = derivatives(lambda: _dense_iteration(dense, u, layer.W)[0, 0]
                       + (_dense_iteration(dense, u, layer.W) ** 2).sum(), params, order=2)
    for g_order, w_order in zip(got, want):
        for g, w in zip(g_order, w_order):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    small = u[:, :2].detach().requires_grad_()
    two = _load(IGNN.replace("4", "2"), tmp_path, "two.fpi")(solve=TIGHT, backward=TIGHT).double()
    assert torch.autograd.gradcheck(lambda v: two(A, v), (small,))
    assert torch.autograd.gradgradcheck(lambda v: two(A, v), (small,))


def test_spmm_transposed_matches_the_dense_transpose(tmp_path):
    text = IGNN.replace("spmm(A, x @ W)", "spmm(A, x @ W, transpose=true)")
    layer = _load(text, tmp_path)(solve=TIGHT, backward=TIGHT).double()
    dense = _graph(seed=3)
    u = torch.randn(8, 4, dtype=F64)
    x = torch.zeros_like(u)
    for _ in range(200):
        x = torch.tanh(dense.T @ (x @ layer.W) + u)
    torch.testing.assert_close(layer(dense.to_sparse(), u), x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad, fragment", [
    (lambda d: d, "input 'A' is declared sparse but got a strided tensor: pass A.to_sparse() (COO) or A.to_sparse_csr()"),
    (lambda d: d.to_sparse().requires_grad_(), "input 'A' is sparse and requires grad, but a sparse input gets no "
                                              "gradient"),
    (lambda d: d.to_sparse().float(), "input 'A' is float32 but the layer's parameters are float64"),
])
def test_a_wrong_tensor_for_a_sparse_input_names_it(bad, fragment, tmp_path):
    layer = _load(IGNN, tmp_path)().double()
    with pytest.raises(LayerInputError) as info:
        layer(bad(_graph()), torch.zeros(8, 4, dtype=F64))
    assert fragment in str(info.value)


def test_a_sparse_tensor_for_a_dense_input_names_it(tmp_path):
    layer = _load(IGNN, tmp_path)().double()
    with pytest.raises(LayerInputError) as info:
        layer(_graph().to_sparse(), torch.zeros(8, 4, dtype=F64).to_sparse())
    assert "input 'u' is declared dense but got a sparse_coo tensor: pass u.to_dense()" in str(info.value)


def test_a_layer_without_sparse_inputs_still_runs_under_torch_func(tmp_path):
    """The sparse checks read only the declared sparse inputs: torch.func transforms of other layers are unchanged."""
    layer = _load(EINSUM_LINEAR, tmp_path)(solve=TIGHT, backward=TIGHT).double()
    a = torch.randn(2, 4, dtype=F64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(layer, p, (a,)))(params)["W"]
    want = torch.autograd.functional.jacobian(
        lambda W: torch.linalg.solve((torch.eye(4, dtype=F64) - W).T, a.T).T, params["W"])
    torch.testing.assert_close(jac, want, rtol=1e-8, atol=1e-10)


def test_sparse_and_einsum_specs_round_trip_through_yaml():
    text = IGNN.replace("spmm(A, x @ W) + u", 'spmm(A, einsum("nd,de->ne", x, W)) + u')
    yaml_text = convert(Source("t.fpi", text), "yaml")
    assert 'A: "sparse [N, N]"' in yaml_text
    back = check_source(Source("t.yaml", yaml_text)).graphs["IGNN"]
    assert back.dtype(back.inputs["A"]) == "sparse"
    assert convert(Source("t.yaml", yaml_text), "fpi").strip() == text.strip()


BAD = [
    # (body, error kind, the text the error points at, a fragment of its message)
    ('einsum("bi,ij->bj", h)', TypeErr, '"bi,ij->bj"', 'the equation "bi,ij->bj" names 2 operands, but einsum was given 1'),
    ('einsum("bi,ij->bj", h, h)', ShapeErr, "h)", "einsum's letter i is 4 in operand 0 but B in operand 1"),
    ('einsum("bi,j->bq", h, a)', TypeErr, 'q"', "the output letter q is not a letter of any operand"),
    ('unsqueeze(einsum("b i->b", h), -1) + h', None, None, None),  # spaces are allowed
    ('einsum("b.i->b", h)', TypeErr, '.i', "a '.' in an einsum equation must be part of `...`"),
    ('einsum("i...->i", h)', TypeErr, '...-', "`...` after a letter in one term of the einsum equation"),
    ('einsum("bi->b->b", h)', TypeErr, "->b\"", "an einsum equation has at most one ->"),
    ('einsum("bi,->b", h)', TypeErr, '"bi,->b"', 'names 2 operands, but einsum was given 1'),
    ("einsum(h, a)", TypeErr, "h, a", "the first argument of einsum is its equation"),
    ('einsum("bi->b", h, a=h)', TypeErr, "a=h", "einsum takes its equation and operands by position"),
    ('einsum("bi,->bi", h, 2)', TypeErr, "2)", "the operands of einsum are tensors, but this one is a number"),
    ("solve(h, h)", ShapeErr, "h, h", "solve needs a square matrix A of shape [.., n, n], found [B, 4]"),
    ("solve(eye(3), h)", ShapeErr, "h)", "needs b of shape [.., 3, k], found [B, 4] (B vs 3)"),  # by ranks
    ("solve(3 * eye(4) + 0 * unsqueeze(h, -1), h)", None, None, None),  # A [B, 4, 4], b [B, 4]: vectors
    ("(-2) ** h", TypeErr, "-2", "the base of ** with a tensor exponent must be positive, found -2"),
    ("arange(0) + h", ShapeErr, "0", "arange(n) needs a positive size, found 0"),
    ("spmm(a, h)", TypeErr, "a, h", "spmm multiplies by a sparse input, but its A is the input a"),
]


@pytest.mark.parametrize("body, kind, at, fragment", BAD, ids=[b for b, *_ in BAD])
def test_mistakes_are_one_positioned_error(body, kind, at, fragment):
    text = ONE_STATE_SPEC.format(body=body)
    if kind is None:
        check_source(Source("ok.fpi", text))
        return
    error = the_one_error(text)
    assert isinstance(error, kind), error
    assert fragment in error.message, error.message
    assert error.span.line == 7, error.span  # the update line
    line = text.splitlines()[6]
    assert error.span.col - 1 == line.index(at, line.index(body)), (error.span, at)


SPARSE_MISUSE = [
    ("tanh(A @ x + u)", "A @ x", "the sparse input A cannot be an argument of @"),
    ("tanh(spmm(A, x) + sum(A, dim=1, keepdim=true))", "A, dim", "the sparse input A cannot be an argument of sum"),
    ("tanh(spmm(u, x) + u)", "u, x", "spmm multiplies by a sparse input, but its A is the input u"),
    ("tanh(spmm(A, A) + u)", "A) +", "the sparse input A cannot be an argument of spmm"),
]


@pytest.mark.parametrize("update, at, fragment", SPARSE_MISUSE, ids=[u for u, *_ in SPARSE_MISUSE])
def test_a_sparse_input_is_read_only_by_spmm(update, at, fragment):
    text = IGNN.replace("tanh(spmm(A, x @ W) + u)", update)
    error = the_one_error(text)
    assert isinstance(error, TypeErr) and fragment in error.message, error
    line = text.splitlines()[error.span.line - 1]
    assert error.span.line == 7 and error.span.col - 1 == line.index(at), (error.span, at)


def test_the_editor_tools_know_sparse_inputs_and_equations():
    """fmt keeps equations and input types; the language server completes input types and hovers `sparse`."""
    from fpidsl.tools.analysis import analyze, completions, hover
    from fpidsl.tools.fmt import format_source

    text = IGNN.replace("spmm(A, x @ W) + u", 'spmm(A, einsum("nd,de->ne", x, W)) + u').lstrip()
    assert format_source(Source("t.fpi", text)) == text
    line = text.splitlines().index("  input A : sparse [N, N]") + 1
    assert {c.label for c in completions("layer L {\n  input A : sp", (2, 15))} == {"int", "bool", "sparse"}
    assert hover(analyze("t.fpi", text), (line, 9)).markdown == "input **A** : `sparse [N, N]`"


SHARED_GRAPH = """
layer Shared {
  input A : sparse [N, N]
  input u : [B, N]
  state x : [B, N]
  update x = tanh(0.5 * transpose(spmm(A, transpose(x, 0, 1)), 0, 1) + u)
}
"""


def test_a_batch_of_signals_on_one_sparse_graph_is_samplewise(tmp_path):
    """With the samples as the columns of spmm's x, each sample is its own problem: the layer is samplewise (finished
    samples are dropped), and matches dense iteration, gradients included."""
    layer = _load(SHARED_GRAPH, tmp_path)(solve=TIGHT, backward=TIGHT).double()
    assert type(layer).SAMPLEWISE
    dense = _graph(seed=4)
    u = torch.randn(3, 8, dtype=F64) * torch.tensor([[1e-3], [0.1], [1.0]], dtype=F64)  # converge at different steps
    u.requires_grad_()
    x = torch.zeros_like(u)
    for _ in range(200):
        x = torch.tanh(0.5 * (dense @ x.T).T + u)
    torch.testing.assert_close(layer(dense.to_sparse(), u), x, rtol=1e-10, atol=1e-12)
    got, = torch.autograd.grad(layer(dense.to_sparse(), u).sum(), u)
    want, = torch.autograd.grad(x.sum(), u)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_the_sparse_graph_benchmark_runs_in_quick_mode(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "sparse_graph.py"
    spec = importlib.util.spec_from_file_location("sparse_graph_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| sparse (spmm) |" in out and "| spmm(A, x, transpose=True) |" in out


def test_spmm_makes_the_sparse_forms_once_per_matrix_and_again_after_an_in_place_change():
    from fpidsl.runtime import ops

    dense = _graph(seed=5)
    A = dense.to_sparse()
    x = torch.randn(8, 3, dtype=F64)
    torch.testing.assert_close(ops.spmm(A, x), dense @ x)
    first = ops._sparse_forms(A)
    assert ops._sparse_forms(A)[1] is first[1]  # cached
    torch.testing.assert_close(ops.spmm(A, x, transpose=True), dense.T @ x)
    A.mul_(2)
    torch.testing.assert_close(ops.spmm(A, x), 2 * dense @ x)
    key = id(A)
    del A, first
    assert key not in ops._SPARSE_FORMS  # dropped with its matrix


@pytest.mark.filterwarnings(CSR_BETA)
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching "
                            "rule:UserWarning")  # torch's, for aten::_sparse_mm under jacrev's vmap (a loop)
def test_a_sparse_layer_runs_under_torch_func(tmp_path):
    """torch.func.grad and jacrev of the layer's output in its parameter, for a COO input: the same as autograd
    (inside a transform spmm multiplies by COO forms; torch's CSR product fails there). A CSR input inside a
    transform is a LayerInputError naming the conversion (torch cannot wrap CSR tensors)."""
    layer = _load(IGNN.replace("4", "2"), tmp_path)(solve=TIGHT, backward=TIGHT).double()
    dense = _graph(n=5, seed=6)
    A = dense.to_sparse()
    u = torch.randn(5, 2, dtype=F64)
    csr = dense.to_sparse_csr()
    with pytest.raises(LayerInputError) as info:
        torch.func.grad(lambda p: torch.func.functional_call(layer, p, (csr, u)).sum())(
            {k: v.detach() for k, v in layer.named_parameters()})
    assert "input 'A' is a CSR matrix inside a torch.func transform" in str(info.value)
    assert "pass A.to_sparse_coo()" in str(info.value)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grad = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (A, u)).sum())(params)["W"]
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(layer, p, (A, u)))(params)["W"]
    want, = torch.autograd.grad(layer(A, u).sum(), layer.W)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(jac.sum(dim=(0, 1)), want, rtol=1e-9, atol=1e-12)
    v = torch.randn(5, 2, dtype=F64)
    _, tangent = torch.func.jvp(lambda w: layer(A, w), (u,), (v,))
    _, by_autograd = torch.autograd.functional.jvp(lambda w: layer(A, w), (u,), (v,))
    torch.testing.assert_close(tangent, by_autograd, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("value, col, end_col", [
    ('einsum("bi,bi->bk", x, a)', 26, 27),  # a plain YAML scalar is parsed in place: the letter itself
    ('"einsum(\\"bi,bi->bk\\", x, a)"', 10, 39),  # escapes: the value's text is not the file's, so the whole value
])
def test_an_equation_error_in_yaml_points_into_the_file(value, col, end_col):
    text = (f"fpi: 1\nlayers:\n  L:\n    inputs: {{a: \"[B, 3]\"}}\n    states: {{x: \"[B, 3]\"}}\n"
            f"    updates:\n      x: {value}\n")
    error = the_one_error_in(Source("e.yaml", text))
    assert "the output letter k is not a letter of any operand" in error.message
    assert (error.span.line, error.span.col, error.span.end_col) == (7, col, end_col)


def the_one_error_in(source: Source):
    from fpidsl.errors import FpiErrors

    with pytest.raises(FpiErrors) as info:
        check_source(source)
    assert len(info.value.errors) == 1, info.value.errors
    return info.value.errors[0]


def test_a_sparse_input_is_declared_as_a_matrix():
    text = IGNN.replace("input A : sparse [N, N]", "input A : sparse [B, N, N]")
    error = the_one_error(text)
    assert isinstance(error, ShapeErr)
    assert error.message == "the sparse input A is a matrix [N, M], but its shape has 3 dimensions"
    assert (error.span.line, error.span.col) == (3, 20)


ATTACK_HEAD = ("layer L {\n  input a : [B, 3]\n  input m : [B, 2, 3]\n  input c : [B, C]\n  state x : [B, 3] = zeros\n"
               "  state z : [B, 2, 3] = zeros\n")
ATTACK_RANKS = {"x": 2, "a": 2, "m": 3, "z": 3, "c": 2, "x[:, 0]": 1, "m[0]": 2, "reshape(m, [B, 6])": 2,
                "z[:, None]": 4, "2 * x": 2}
ATTACK_TERMS = ["", "b", "bi", "ib", "bij", "...i", "...ij", "i", "ij", "ji", "bii", "..", "b1", "B", "bJ"]


def _attack_calls():
    """einsum calls: half of them with terms drawn at random (mostly ill-formed), half with one letter per dim of
    each operand from a small pool (so sizes may clash) and an output drawn from the letters written."""
    from hypothesis import strategies as st

    @st.composite
    def call(draw):
        operands = draw(st.lists(st.sampled_from(sorted(ATTACK_RANKS)), min_size=1, max_size=3))
        if draw(st.booleans()):
            terms = draw(st.lists(st.sampled_from(ATTACK_TERMS), min_size=1, max_size=3))
            output = draw(st.one_of(st.none(), st.sampled_from(ATTACK_TERMS)))
        else:
            terms = []
            for op in operands:
                rank = ATTACK_RANKS[op]
                lead = draw(st.integers(0, rank)) if draw(st.booleans()) else None
                letters = draw(st.lists(st.sampled_from("bijk"), min_size=rank - (lead or 0),
                                        max_size=rank - (lead or 0), unique=True))
                terms.append(("..." if lead is not None else "") + "".join(letters))
            written = sorted({ch for t in terms for ch in t if ch != "."})
            kept = draw(st.lists(st.sampled_from(written), unique=True)) if written else []
            ellipsis = "..." if any(t.startswith("...") for t in terms) else ""
            output = draw(st.sampled_from([None, ellipsis + "".join(kept)]))
        equation = ",".join(terms) + ("" if output is None else "->" + output)
        return f'einsum("{equation}", {", ".join(operands)})'

    return call()


def test_einsum_calls_that_check_clean_compile_load_and_run():
    """Random equations (well- and ill-formed) over operands of several shapes: each either fails at check with
    fpidsl's errors, or compiles, loads and runs forward and backward."""
    import warnings

    from hypothesis import HealthCheck, given, settings

    from fpidsl.errors import FpiError, FpiErrors
    from fpidsl.loader import module_from_source
    from fpidsl.compiler import compile_source

    @settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(_attack_calls())
    def run(call):
        text = (ATTACK_HEAD + f"  let h = {call}\n  update x = 0.5 * x + a + 0.1 * tanh(sum(h))\n"
                "  update z = 0.5 * z + m * 0.1 * tanh(mean(h))\n}\n")
        source = Source("e.fpi", text)
        try:
            check_source(source)
        except (FpiError, FpiErrors):
            return
        module = module_from_source(compile_source(source), "<einsum call>", "fpidsl_einsum_call")
        layer = module.LAYERS["L"](solve={"max_iter": 30}, backward={"max_iter": 30}).double()
        inputs = [torch.randn(2, 3, dtype=F64, requires_grad=True), torch.randn(2, 2, 3, dtype=F64, requires_grad=True),
                  torch.randn(2, 4, dtype=F64, requires_grad=True)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = layer(*inputs)
            sum(o.sum() for o in out).backward()

    run()
