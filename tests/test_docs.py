"""The documentation runs: every code block of README.md and docs/*.md is executed or checked.

* ```python blocks: the blocks of one file run in order in one fresh namespace, with the repository root as
  the working directory and one torch thread (pytest's ``filterwarnings = error`` applies: a snippet that
  warns fails).
* ```fpi blocks are checked by the front-end (as ``doc.fpi``); ```yaml blocks that start with ``fpi:`` likewise
  (as ``doc.yaml``). A block preceded by ``<!-- bad-spec -->`` must fail with an fpidsl error instead, and when
  the next block is a ```text block starting with ``doc.fpi:`` (or ``doc.yaml:``), it must be exactly what
  ``fpidsl check`` prints for those errors.
* ```console / ```sh blocks: each line ``$ fpidsl ...`` runs with the venv's fpidsl in a scratch directory
  that links the repository's top-level entries (so ``specs/...`` resolves and written files land outside the
  tree). The lines after a command, up to the next ``$``, are its expected output (stdout and stderr merged):
  compared line by line, where a line ``...`` skips any number of lines. The exit status must be 0, or N
  after ``<!-- exit N -->``.
* ``<!-- no-test -->`` before a block skips it; use it only for what cannot run here (e.g. torchrun).
"""
from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses or long runs: not in `pytest -m "not slow"`

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS = [p for p in DOCS if p.exists()]

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARK = re.compile(r"^<!--\s*(no-test|bad-spec|exit\s+\d+)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the first line of code (after the opening fence)
    lang: str
    text: str
    marks: tuple[str, ...]
    following: "Block | None" = None  # the next fenced block when only blank lines separate them

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def exit_status(self) -> int:
        for mark in self.marks:
            if mark.startswith("exit"):
                return int(mark.split()[1])
        return 0


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the HTML-comment marks on the lines just above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[tuple[Block, int]] = []  # (block, index of the closing fence)
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        marks = []
        k = start - 1
        while k >= 0 and (not lines[k].strip() or _MARK.match(lines[k].strip())):
            if lines[k].strip():
                marks.append(_MARK.match(lines[k].strip()).group(1))
            k -= 1
        text = "\n".join(lines[start + 1:j]) + "\n"
        found.append((Block(path, start + 2, m.group(1).lower(), text, tuple(marks)), j))
        i = j + 1
    out = []
    for n, (block, close) in enumerate(found):
        following = None
        if n + 1 < len(found):
            nxt, _ = found[n + 1]
            between = lines[close + 1:nxt.line - 2]
            if all(not ln.strip() for ln in between):
                following = nxt
        out.append(Block(block.path, block.line, block.lang, block.text, block.marks, following))
    return out


ALL = [b for p in DOCS for b in blocks_of(p)]


def _spec_blocks() -> list[Block]:
    out = []
    for b in ALL:
        if "no-test" in b.marks:
            continue
        if b.lang == "fpi" or (b.lang in ("yaml", "yml") and _is_yaml_spec(b.text)):
            out.append(b)
    return out


def _is_yaml_spec(text: str) -> bool:
    body = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return bool(body) and body[0].startswith("fpi:")


def _console_blocks() -> list[Block]:
    return [b for b in ALL if b.lang in ("console", "sh", "shell") and "no-test" not in b.marks
            and any(ln.startswith("$ fpidsl ") for ln in b.text.splitlines())]


# --------------------------------------------------------------------------- python


def _python_files() -> list[Path]:
    return [p for p in DOCS if any(b.path == p and b.lang == "python" for b in ALL)]


def run_python_blocks(path: Path, namespace: dict | None = None) -> dict:
    """Run the python blocks of one file, in order, in one namespace; returns the namespace."""
    import torch

    torch.set_num_threads(1)
    namespace = {"__name__": f"doc_{path.stem}"} if namespace is None else namespace
    for block in (b for b in ALL if b.path == path and b.lang == "python"):
        if "no-test" in block.marks:
            continue
        # pad so that a traceback's line numbers are the markdown file's
        code = compile("\n" * (block.line - 1) + block.text, str(path), "exec")
        exec(code, namespace)  # noqa: S102 - the project's own documentation
    return namespace


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run_python_blocks(path)


# --------------------------------------------------------------------------- specs


def _check(block: Block):
    from fpidsl.compiler import check_source
    from fpidsl.source import Source

    name = "doc.fpi" if block.lang == "fpi" else "doc.yaml"
    source = Source(name, block.text)
    return source, lambda: check_source(source)


@pytest.mark.parametrize("block", _spec_blocks(), ids=lambda b: b.where)
def test_spec_blocks_check(block):
    from fpidsl.cli import report
    from fpidsl.errors import FpiError, FpiErrors, render

    source, check = _check(block)
    if "bad-spec" not in block.marks:
        try:
            check()
        except (FpiError, FpiErrors) as exc:
            errors = exc.errors if isinstance(exc, FpiErrors) else [exc]
            pytest.fail(f"{block.where}: the spec does not check:\n" + "\n".join(render(e, source) for e in errors))
        return
    with pytest.raises((FpiError, FpiErrors)) as info:
        check()
    shown = block.following
    if shown is not None and shown.lang == "text" and shown.text.startswith(source.path + ":"):
        stream = io.StringIO()
        report(info.value, stream, source=source)
        assert stream.getvalue().rstrip() == shown.text.rstrip(), f"{shown.where}: the error shown is not the output"


# --------------------------------------------------------------------------- command lines


def _fpidsl() -> list[str]:
    exe = Path(sys.executable).parent / "fpidsl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fpidsl"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A working directory whose entries link to the repository's top-level files and folders."""
    where = tmp_path_factory.mktemp("console")
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (where / entry.name).symlink_to(entry)
    return where


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for each ``$ fpidsl`` line of a console block."""
    out: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("$ "):
            current = None
            if line.startswith("$ fpidsl "):
                current = []
                out.append((line[2:], current))
        elif current is not None:
            current.append(line.rstrip())
    for _, expected in out:
        while expected and not expected[-1]:
            expected.pop()
    return out


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` is ``expected`` line by line, a ``...`` line standing for any lines."""
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head == "...":
        return any(matches(rest, actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and actual[0] == head and matches(rest, actual[1:])


@pytest.mark.parametrize("block", _console_blocks(), ids=lambda b: b.where)
def test_console_blocks(block, scratch):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100"}
    for command, expected in _commands(block.text):
        argv = shlex.split(command)
        outputs = [a for a in argv if a.endswith((".png", ".svg"))]
        if argv[1:2] == ["graph"] and outputs and shutil.which("dot") is None:
            pytest.skip("drawing SVG/PNG needs Graphviz's dot, which is not installed")
        result = subprocess.run(_fpidsl() + argv[1:], cwd=scratch, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=120)
        actual = [ln.rstrip() for ln in result.stdout.splitlines()]
        while actual and not actual[-1]:
            actual.pop()
        assert result.returncode == block.exit_status(), \
            f"{block.where}: `{command}` exited {result.returncode}:\n{result.stdout}"
        if expected:
            assert matches(expected, actual), \
                f"{block.where}: `{command}` printed:\n{result.stdout}\nwhich does not match:\n" + "\n".join(expected)


# --------------------------------------------------------------------------- the primitive table


def test_language_primitive_table_is_generated():
    """docs/LANGUAGE.md shows the table that its own generator block prints."""
    path = ROOT / "docs" / "LANGUAGE.md"
    if not path.exists():
        pytest.skip("docs/LANGUAGE.md is not written yet")
    generator = [b for b in ALL if b.path == path and b.lang == "python" and "# prints the primitive table" in b.text]
    assert len(generator) == 1, "LANGUAGE.md has one python block marked `# prints the primitive table`"
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(generator[0].text, str(path), "exec"), {"__name__": "doc_table"})  # noqa: S102
    tables: list[list[str]] = [[]]
    for line in out.getvalue().splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    tables = [t for t in tables if t]
    assert tables, "the generator printed no table"
    text = path.read_text(encoding="utf-8").splitlines()
    for table in tables:
        start = text.index(table[0]) if table[0] in text else -1
        assert start >= 0 and text[start:start + len(table)] == table, \
            f"LANGUAGE.md does not show the generated table that starts {table[0]!r}, or it is out of date"


# --------------------------------------------------------------------------- the harness itself


def test_matching_rules():
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert matches(["a", "..."], ["a", "b"])
    assert not matches(["a", "b"], ["a", "b", "c"])
    assert not matches(["a", "...", "x"], ["a", "b"])
    assert _commands("$ fpidsl check x\nok\n\n$ ls\nfoo\n$ fpidsl compile y\n") == \
        [("fpidsl check x", ["ok"]), ("fpidsl compile y", [])]
