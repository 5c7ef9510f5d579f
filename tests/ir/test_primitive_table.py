"""Every primitive's entry in the table declares every fact the compiler needs (issue 12): adding a primitive is
one entry plus its tests, and an incomplete entry fails here."""
from __future__ import annotations

import inspect

import pytest

from fpidsl.ir import batching
from fpidsl.ir.derivatives import RULES as VJP_RULES
from fpidsl.ir.primitives import PRIMITIVES
from fpidsl.passes import lipschitz
from fpidsl.runtime import ops

NAMES = sorted(PRIMITIVES)


@pytest.mark.parametrize("name", NAMES)
def test_the_entry_is_complete(name):
    prim = PRIMITIVES[name]
    assert callable(prim.shape), "no shape rule"
    assert prim.vjp is VJP_RULES[name], "its vjp is not the rule of fpidsl/ir/derivatives.py of its name"
    assert callable(prim.batch) and len(inspect.signature(prim.batch).parameters) == 4, "no batch rule"
    lowering = getattr(ops, prim.op, None)
    assert callable(lowering), f"fpidsl.runtime.ops has no function {prim.op!r}"
    params = inspect.signature(lowering).parameters
    keywords = {p.name for p in params.values() if p.kind is p.KEYWORD_ONLY}
    assert {a.name for a in prim.attrs} <= keywords | set(params), f"{prim.op} does not take {prim.attrs}"
    law = prim.lipschitz
    assert law is None or isinstance(law, float) or law in lipschitz.RULES, f"unknown Lipschitz rule {law!r}"
    if prim.builtin:
        assert law is not None, "a builtin needs a Lipschitz rule (a constant or a rule name)"
    for fact in (prim.narrow, prim.distribute):
        assert fact is None or (isinstance(fact, tuple) and len(fact) == 2 and all(isinstance(i, int) for i in fact))


def test_no_rule_is_left_without_a_primitive():
    assert set(VJP_RULES) == set(PRIMITIVES)
    named = {p.lipschitz for p in PRIMITIVES.values() if isinstance(p.lipschitz, str)}
    assert named == set(lipschitz.RULES)


def test_batch_rules_are_the_module_s_factories():
    factories = {name for name, fn in vars(batching).items() if inspect.isfunction(fn)
                 and fn.__module__ == batching.__name__ and not name.startswith("_")}
    for prim in PRIMITIVES.values():
        assert prim.batch.__qualname__.split(".<locals>")[0] in factories, prim.name


def test_every_shipped_layer_lowers_to_graphs_that_lint_after_every_pass():
    from fpidsl.compiler import check_file
    from tests.conftest import shipped_specs

    for spec in shipped_specs():
        for name, lowered in check_file(str(spec)).lowered(lint=True).items():
            for g in lowered.graphs():
                g.lint()
            assert lowered.adjoint is not None and lowered.samplewise in (True, False), (spec.name, name)


def test_index_arguments_name_real_positions_and_the_order_every_parameter():
    from fpidsl.frontend.ast import INPUT_DTYPES

    for prim in PRIMITIVES.values():
        for pos, dtypes in prim.index_args:
            assert 0 <= pos < len(prim.inputs) and set(dtypes) <= set(INPUT_DTYPES), prim.name
        assert set(prim.module_attrs) <= {a.name for a in prim.attrs}, prim.name
        if prim.order:  # every parameter a spec writes; the module form's own attributes are not written
            assert not set(prim.order) & set(prim.module_attrs), prim.name
            assert sorted(prim.order) == sorted(list(prim.written_inputs) + [a.name for a in prim.attrs
                                                                              if a.name not in prim.module_attrs]), prim.name
        assert not prim.keeps_dtype or len(prim.inputs) == 1, prim.name
