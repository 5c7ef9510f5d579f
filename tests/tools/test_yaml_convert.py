"""`fpidsl fmt --to fpi|yaml`: each shipped spec converts to the other form with the same graph and the same
emitted code, comments carried; what the YAML form cannot hold is refused with a positioned error."""
from __future__ import annotations

from pathlib import Path

import pytest

from fpidsl.cli import main
from fpidsl.compiler import check_source
from fpidsl.errors import FpiError, FpiErrors
from fpidsl.frontend.ast_compare import strip_spans
from fpidsl.frontend.load import parse_source
from fpidsl.frontend.read import read_source
from fpidsl.source import Source
from fpidsl.tools.fmt import format_source
from fpidsl.tools.yaml_convert import ConversionError, convert, reorder
from tests.tools.test_fmt import FPI_SPECS, ROOT, YAML_SPECS, code_text, comments, graph_text, rel


def _yaml_comments(text: str) -> list[str]:
    return [line[line.index("#"):] for line in text.splitlines() if "#" in line]


@pytest.mark.parametrize("spec", FPI_SPECS, ids=rel)
def test_fpi_to_yaml_and_back(spec, monkeypatch):
    monkeypatch.chdir(ROOT)
    source = read_source(rel(spec))
    try:
        before = check_source(source)
    except (FpiError, FpiErrors):
        pytest.skip(f"{rel(spec)} is kept for its errors")  # test_fmt covers it
    yaml_text = convert(source, "yaml")
    as_yaml = Source(rel(spec.with_suffix(".yaml")), yaml_text)
    assert strip_spans(parse_source(as_yaml)) == strip_spans(reorder(parse_source(source)))
    after = check_source(as_yaml)
    assert graph_text(after) == graph_text(before)
    assert code_text(after) == code_text(before)
    # every comment travels with what it is next to: in the source's order unless the YAML form reorders
    in_order = strip_spans(reorder(parse_source(source))) == strip_spans(parse_source(source))
    same = (lambda a, b: a == b) if in_order else (lambda a, b: sorted(a) == sorted(b))  # noqa: E731
    assert same(_yaml_comments(yaml_text), comments(source.text))
    back = convert(as_yaml, "fpi")
    assert same(comments(back), comments(source.text))
    assert graph_text(check_source(Source(source.path, back))) == graph_text(before)
    if strip_spans(reorder(parse_source(source))) == strip_spans(parse_source(source)):
        # declarations already in the YAML form's order: the round trip is the formatted file, up to blank lines
        squeeze = lambda t: [ln for ln in t.splitlines() if ln.strip()]  # noqa: E731
        assert squeeze(back) == squeeze(format_source(source))


@pytest.mark.parametrize("spec", YAML_SPECS, ids=rel)
def test_yaml_to_fpi(spec, monkeypatch):
    monkeypatch.chdir(ROOT)
    source = read_source(rel(spec))
    fpi_text = convert(source, "fpi")
    as_fpi = Source(rel(spec.with_suffix(".converted.fpi")), fpi_text)
    assert format_source(as_fpi) == fpi_text
    assert strip_spans(parse_source(as_fpi)) == strip_spans(parse_source(source))
    before, after = check_source(source), check_source(as_fpi)
    assert graph_text(after) == graph_text(before)
    assert code_text(after) == code_text(before)
    assert comments(fpi_text) == _yaml_comments(source.text)


def test_comments_go_with_their_declarations():
    text = ("# file\nlayer L {  # the layer\n  # the data\n  input a : [B, 4]  # a batch\n  state x : [B, 4]\n"
            "  update x = 0.5 * a\n  # last\n}\n")
    out = convert(Source("c.fpi", text), "yaml")
    assert out == ('# file\nfpi: 1\nlayers:\n  L:  # the layer\n    inputs:\n      # the data\n'
                   '      a: "[B, 4]"  # a batch\n    states:\n      x: "[B, 4]"\n    updates:\n'
                   '      x: "0.5 * a"\n    # last\n')
    assert convert(Source("c.yaml", out), "fpi") == (
        "# file\n\nlayer L {  # the layer\n  # the data\n  input a : [B, 4]  # a batch\n  state x : [B, 4]\n"
        "  update x = 0.5 * a\n  # last\n}\n")


def test_fns_names_yaml_reads_as_other_types_and_expressions():
    text = ("fn sq(v) = v * v\nfn two() = 2\nlayer L {\n  input off : [B, 4]\n  state yes : [B, 4] = -0.5\n"
            "  param w : tensor [4] = normal(0, 0.1)\n  const k = 2 * 3\n  let h = sq(yes[:, ::2]) ** 2 / -(off - 1)\n"
            "  energy E = sum(square(yes - off), dim=-1)\n  descend yes on E step 1e-2\n  output yes, h\n"
            "  solve { method = anderson(m=5), tol = 1e-6 }\n  backward { max_iter = 30 }\n}\n")
    source = Source("n.fpi", text)
    out = convert(source, "yaml")
    assert '"off": "[B, 4]"' in out and '"yes": {shape: "[B, 4]", init: "-0.5"}' in out
    assert '"sq(v)": "v * v"' in out and '"two()": "2"' in out
    assert strip_spans(parse_source(Source("n.yaml", out))) == strip_spans(reorder(parse_source(source)))


def test_what_yaml_cannot_hold_is_refused(tmp_path, capsys):
    two_solves = "layer L {\n  input a : [B]\n  state x : [B]\n  update x = a\n  solve { tol = 1e-6 }\n" \
                 "  solve { max_iter = 3 }\n}\n"
    with pytest.raises(ConversionError) as info:
        convert(Source("t.fpi", two_solves), "yaml")
    assert info.value.kind == "conversion"
    assert (info.value.span.line, info.value.span.col) == (6, 3)
    assert info.value.message == "a second `solve` block in layer L: the YAML form holds one"
    spec = tmp_path / "t.fpi"
    spec.write_text(two_solves)
    assert main(["fmt", "--to", "yaml", str(spec)]) == 1
    assert capsys.readouterr().err.startswith(f"{spec}:6:3: error: a second `solve` block in layer L")
    two_updates = two_solves.replace("  solve { max_iter = 3 }\n", "  update x = 2 * a\n")
    with pytest.raises(ConversionError, match="a second entry `x` in `updates`") as info:
        convert(Source("t.fpi", two_updates), "yaml")
    assert (info.value.span.line, info.value.span.col) == (6, 3)


def test_the_command_writes_the_other_form(tmp_path, capsys):
    out = tmp_path / "box.yaml"
    assert main(["fmt", "--to", "yaml", str(ROOT / "specs" / "box_projection.fpi"), "-o", str(out)]) == 0
    assert main(["fmt", "--to", "fpi", str(out)]) == 0
    printed = capsys.readouterr().out
    squeeze = lambda t: [ln for ln in t.splitlines() if ln.strip()]  # noqa: E731
    assert squeeze(printed) == squeeze(format_source(read_source(str(ROOT / "specs" / "box_projection.fpi"))))
    assert main(["fmt", "--to", "fpi", str(Path(ROOT / "specs" / "missing.yaml"))]) == 1


def test_descend_on_an_energy_yaml_reads_as_another_type():
    """`on: yes` is a boolean to YAML: the energy's name is quoted like every other name."""
    text = ("layer L {\n  input a : [B, 4]\n  state x : [B, 4]\n  energy yes = sum(square(x - a), dim=-1)\n"
            "  descend x on yes step 0.1\n}\nlayer M {\n  input a : [B, 4]\n  state x : [B, 4]\n"
            "  energy Null = sum(square(x - a), dim=-1)\n  descend x on Null step 0.1\n}\n")
    source = Source("d.fpi", text)
    out = convert(source, "yaml")
    assert 'x: {on: "yes", step: 0.1}' in out and 'x: {on: "Null", step: 0.1}' in out
    as_yaml = Source("d.yaml", out)
    assert strip_spans(parse_source(as_yaml)) == strip_spans(reorder(parse_source(source)))
    assert graph_text(check_source(as_yaml)) == graph_text(check_source(source))


def test_numbers_with_a_leading_zero_are_quoted():
    """YAML 1.1 reads a plain `010` as octal 8 (and the YAML front-end refuses it): --to yaml quotes it, so it reads
    back as the 10 of the .fpi text."""
    text = ("layer L {\n  const k = 010\n  input a : [B, 010]\n  state x : [B, 10] = 007\n"
            "  update x = 0.5 * x + k * a\n  solve { max_iter = 0100, tol = 0.001 }\n}\n")
    source = Source("z.fpi", text)
    out = convert(source, "yaml")
    assert 'k: "010"' in out and 'init: "007"' in out and 'max_iter: "0100"' in out and "tol: 0.001" in out
    checked = check_source(Source("z.yaml", out))
    assert checked.graphs["L"].solve["max_iter"] == 100 and graph_text(checked) == graph_text(check_source(source))


def test_a_spec_already_in_the_target_form_is_wrong_usage(tmp_path, capsys):
    """`--to fpi x.fpi` used to read the .fpi text as YAML and report a YAML error in it."""
    spec = tmp_path / "ok.fpi"
    spec.write_text("layer L {\n  input a : [B]\n  state x : [B]\n  update x = 0.5 * x + a\n}\n")
    assert main(["fmt", "--to", "fpi", str(spec)]) == 2
    assert capsys.readouterr().err == (f"fpidsl: error: {spec} is already in the fpi form; --to fpi converts a spec of "
                                       "the other form (`fpidsl fmt` lays out .fpi files)\n")
    assert main(["fmt", "--to", "yaml", str(ROOT / "specs" / "box_projection.yaml")]) == 2
    assert "is already in the yaml form" in capsys.readouterr().err
