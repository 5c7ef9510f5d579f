"""The spec's ``eval { ... }`` block: the forward settings of eval mode, over ``solve``, from every front end."""
from __future__ import annotations

import pytest
import torch

import fpidsl
from fpidsl.errors import SettingsErr, SyntaxErr
from fpidsl.source import Source
from fpidsl.tools.fmt import format_source
from fpidsl.tools.yaml_convert import convert
from tests.ir.helpers import errors, graph, locate

from .helpers import DTYPE

# x <- 0.9 tanh(x) + a: contraction 0.9, about 150 Picard iterations to 1e-10
SPEC = """layer Slow {
  input a : [B, 4]
  state x : [B, 4] = zeros
  update x = 0.9 * tanh(x) + a
  solve { tol = 1e-10, max_iter = 400 }
  eval { max_iter = 5, on_fail = ignore }
}
"""


@pytest.fixture
def slow(tmp_path):
    path = tmp_path / "slow.fpi"
    path.write_text(SPEC)
    return fpidsl.load(str(path))


def test_eval_block_sets_the_budget_of_eval_mode_only(slow):
    layer = slow()
    a = torch.rand(3, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))  # 79 iterations (unseeded: 24-159,
    # below 50 for 6 of the seeds 0-19)
    trained = layer(a)
    assert layer.stats.forward.max_iterations > 50 and layer.stats.forward.all_ok
    layer.eval()
    with torch.no_grad():
        cheap = layer(a)
    forward = layer.stats.forward
    assert (forward.settings.max_iter, forward.max_iterations) == (5, 5)
    assert forward.settings.tol == 1e-10  # the rest comes from solve
    assert not forward.all_ok  # five iterations do not reach 1e-10; on_fail = ignore says nothing
    # an independent oracle: five Picard steps from zeros
    x = torch.zeros_like(a)
    for _ in range(5):
        x = 0.9 * torch.tanh(x) + a
    torch.testing.assert_close(cheap, x, rtol=0, atol=1e-15)
    layer.train()
    torch.testing.assert_close(layer(a), trained, rtol=0, atol=0)
    assert layer.stats.forward.settings.max_iter == 400


def test_an_error_in_the_eval_settings_names_where_they_come_from(slow):
    """A ``solve`` override that the spec's eval block contradicts was blamed on ``eval_solve``, not passed."""
    with pytest.raises(fpidsl.SettingsError, match=r"eval-mode settings \(the spec's eval block over the solve "
                                                   r"settings\): min_iter must be <= max_iter") as info:
        slow(solve={"min_iter": 50})
    assert "eval_solve" not in str(info.value)
    with pytest.raises(fpidsl.SettingsError, match=r"\(eval_solve over the spec's eval block over the solve"):
        slow(eval_solve={"min_iter": 50})


def test_instance_eval_solve_goes_over_the_spec_block(slow):
    layer = slow(eval_solve={"max_iter": 7}).eval()
    with torch.no_grad():
        layer(torch.rand(2, 4, dtype=DTYPE))
    settings = layer.stats.forward.settings
    assert (settings.max_iter, settings.on_fail, settings.tol) == (7, "ignore", 1e-10)
    assert slow.EVAL == {"max_iter": 5, "on_fail": "ignore"}


def test_eval_settings_follow_solve_settings_assigned_later(slow):
    """Assigned after the layer was made, solve_settings reached train mode only: eval mode kept the settings the
    layer was built with (a helper's probe: an eval solve stopped at the old tolerance). An assigned eval_settings
    is kept."""
    layer = slow(eval_solve={"max_iter": 50}).double()
    layer.solve_settings = layer.solve_settings.merged({"tol": 1e-3})
    layer.eval()
    layer(torch.randn(2, 4, dtype=DTYPE))
    used = layer.stats.forward.settings
    assert (used.tol, used.max_iter, used.on_fail) == (1e-3, 50, "ignore")  # eval block and eval_solve kept
    assert layer.eval_settings == used and layer.stats.forward.max_iterations < 50
    chosen = layer.eval_settings.merged({"max_iter": 7})
    layer.eval_settings = chosen
    layer.solve_settings = layer.solve_settings.merged({"tol": 1e-4})
    layer(torch.randn(2, 4, dtype=DTYPE))
    assert layer.eval_settings is chosen


def test_eval_block_reaches_the_graph_text_and_explain():
    g = graph(SPEC)
    assert g.eval_solve == {"max_iter": 5, "on_fail": "ignore"}
    assert "  eval max_iter=5, on_fail=ignore" in g.format()


def test_a_layer_without_an_eval_block_emits_no_eval_table(tmp_path):
    path = tmp_path / "plain.fpi"
    path.write_text(SPEC.replace("  eval { max_iter = 5, on_fail = ignore }\n", ""))
    cls = fpidsl.load(str(path))
    assert cls.EVAL == {}
    layer = cls().eval()
    assert layer.eval_settings == layer.solve_settings


LAYER = "layer L {{\n  input a : [B, 4]\n  state x : [B, 4]\n  update x = 0.5 * tanh(x) + a\n  {}\n}}\n"
BAD = [
    ("eval { mode = jfb }", "mode", "mode is a backward setting"),
    ("eval { method = gmres }", "gmres", "gmres solves the linear system of the backward"),
    ("eval { maxiter = 3 }", "maxiter", "unknown eval setting maxiter"),
    ("eval { m = 3 }", "m = 3", "m applies to method = anderson or broyden, but the method is picard"),
    ("solve { max_iter = 10 }\n  eval { min_iter = 20 }", "min_iter = 20", "min_iter = 20 is larger than max_iter = 10"),
    ("eval { tol = 0 }", "0 }", "tol must be a number > 0"),
]


@pytest.mark.parametrize("block, anchor, message", BAD, ids=[b[0].replace("\n", " ") for b in BAD])
def test_bad_eval_settings_are_positioned_errors(block, anchor, message):
    text = LAYER.format(block)
    (error,) = errors(text)
    assert isinstance(error, SettingsErr)
    assert message in error.message
    assert (error.span.line, error.span.col) == locate(text, anchor)


def test_min_iter_over_the_solve_budget_names_where_the_budget_comes_from():
    (error,) = errors(LAYER.format("solve { max_iter = 10 }\n  eval { min_iter = 20 }"))
    assert error.hint == "max_iter comes from the solve block"


def test_eval_options_are_checked_against_the_method_of_solve():
    g = graph(LAYER.format("solve { method = anderson(m=5) }\n  eval { m = 2, max_iter = 10 }"))
    assert g.eval_solve == {"m": 2, "max_iter": 10}


def test_a_second_eval_block_is_an_error_at_its_position():
    text = LAYER.format("eval { max_iter = 3 }\n  eval { tol = 1e-3 }")
    (error,) = errors(text)
    assert "eval" in error.message
    assert (error.span.line, error.span.col) == locate(text, "eval", 2)


def test_eval_stays_a_name_outside_a_block_opening():
    """``eval`` opens a block only where a declaration starts; specs that named a value ``eval`` still check."""
    g = graph("layer L {\n  input a : [B, 4]\n  let eval = a * 2\n  state x : [B, 4]\n"
              "  update x = 0.5 * tanh(x) + eval\n  eval { max_iter = 9 }\n}\n")
    assert "eval" in g.lets and g.eval_solve == {"max_iter": 9}


def test_eval_without_braces_is_a_syntax_error():
    text = LAYER.format("eval max_iter = 3")
    (error,) = errors(text)
    assert isinstance(error, SyntaxErr)
    assert error.message == "expected '{', found name 'max_iter'"
    assert (error.span.line, error.span.col) == locate(text, "max_iter")


YAML = """fpi: 1
layers:
  Slow:
    inputs:
      a: "[B, 4]"
    states:
      x: {shape: "[B, 4]", init: zeros}
    updates:
      x: "0.9 * tanh(x) + a"
    solve: {tol: 1e-10, max_iter: 400}
    eval: {max_iter: 5, on_fail: ignore}
"""


def test_yaml_eval_section_is_the_same_block(tmp_path):
    path = tmp_path / "slow.yaml"
    path.write_text(YAML)
    cls = fpidsl.load(str(path))
    assert cls.EVAL == {"max_iter": 5, "on_fail": "ignore"}
    assert convert(Source("slow.fpi", SPEC), "yaml").endswith("    eval: {max_iter: 5, on_fail: ignore}\n")
    assert convert(Source("slow.yaml", YAML), "fpi") == SPEC


def test_fmt_keeps_the_eval_block():
    assert format_source(Source("slow.fpi", SPEC)) == SPEC


def test_eval_is_highlighted_as_a_keyword_only_before_a_brace():
    from pygments.token import Keyword, Name

    from fpidsl.tools.lexer import FpiLexer

    tokens = list(FpiLexer().get_tokens("let eval = a\neval { max_iter = 3 }\n"))
    kinds = [kind for kind, text in tokens if text == "eval"]
    assert kinds[0] in Name.Variable and kinds[1] in Keyword.Declaration


def test_the_editor_completes_and_explains_eval_settings():
    from fpidsl.tools.analysis import analyze, completions, hover

    typing = LAYER.format("eval { max_iter = 5, met")
    settings = {c.label for c in completions(typing, locate(typing, "met"))}
    assert {"method", "tol", "on_fail"} <= settings and "tanh" not in settings
    text = LAYER.format("eval { max_iter = 5 }")
    assert hover(analyze("t.fpi", text), locate(text, "max_iter")).markdown.startswith("`eval` setting **max_iter**")


def test_a_fixed_point_modules_eval_settings_follow_solve_settings_assigned_later():
    from fpidsl import FixedPoint

    module = FixedPoint(lambda x, a: 0.9 * torch.tanh(x) + a, solve={"tol": 1e-3}, eval_solve={"max_iter": 3000})
    module.solve_settings = module.solve_settings.merged({"tol": 1e-12})
    module.eval()
    module(torch.zeros(2, 4, dtype=DTYPE), torch.randn(2, 4, dtype=DTYPE))
    used = module.stats.forward.settings
    assert (used.tol, used.max_iter) == (1e-12, 3000) and bool(module.stats.forward.converged.all())
