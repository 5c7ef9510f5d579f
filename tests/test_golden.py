"""Golden files: the graph text of every shipped layer. Update with `FPIDSL_UPDATE_GOLDEN=1 pytest tests/test_golden.py`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fpidsl.compiler import check_file
from fpidsl.frontend.ast_compare import strip_spans
from tests.conftest import ROOT, SPECS

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FPIDSL_UPDATE_GOLDEN") == "1"
FPI_SPECS = sorted(SPECS.glob("*.fpi"))


def compare(path: Path, text: str) -> None:
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"{path} is missing; run with FPIDSL_UPDATE_GOLDEN=1 to create it")
        path.write_text(text)
        return
    assert text == path.read_text(), f"{path.name} changed; rerun with FPIDSL_UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("spec", FPI_SPECS, ids=lambda p: p.stem)
def test_graph_text(spec):
    os.chdir(ROOT)
    checked = check_file(str(spec.relative_to(ROOT)))
    text = "\n\n".join(g.format() for g in checked.graphs.values()) + "\n"
    compare(GOLDEN / f"{spec.stem}.graph.txt", text)


@pytest.mark.parametrize("yaml_spec", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_twins_give_the_same_ast_and_graph(yaml_spec):
    twin = yaml_spec.with_suffix(".fpi")
    assert twin.exists(), f"{yaml_spec.name} has no .fpi twin"
    from_yaml, from_fpi = check_file(str(yaml_spec)), check_file(str(twin))
    assert strip_spans(from_yaml.spec) == strip_spans(from_fpi.spec)
    assert list(from_yaml.graphs) == list(from_fpi.graphs)
    for name in from_fpi.graphs:
        strip = lambda text: "\n".join(line.split("#")[0].rstrip() for line in text.splitlines())  # noqa: E731
        assert strip(from_yaml.graphs[name].format()) == strip(from_fpi.graphs[name].format())
