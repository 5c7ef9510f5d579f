"""No import runs upward (issue 12): the packages of fpidsl form layers, and a module imports only its own package
and the layers below it, whether at the top of the file or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "fpidsl"

# Lower numbers are lower layers. The runtime is what emitted code imports: it knows nothing of the compiler.
LAYER = {
    "fpidsl": 0, "__version__": 0, "source": 0, "interface": 0,
    "errors": 1, "limits": 1, "outfile": 1,
    "runtime": 2, "frontend": 2,
    "ir": 3,
    "passes": 4,
    "codegen": 5,
    "compiler": 6,
    "loader": 7,
    "lipschitz_report": 8, "tracing": 8,  # tracing: the PyTorch front-end, on the compiler and the loader
    "plot": 9, "cli": 9, "__main__": 9, "tools": 9,  # the user-facing commands, one layer
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            out |= {n for n in names if n.split(".")[0] == "fpidsl"}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fpidsl"}
    return out


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fpidsl"


FILES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downward(path):
    here = _group(_module(path))
    assert here in LAYER, f"add {here} to LAYER in tests/test_layering.py"
    for target in sorted(_imports(path)):
        there = _group(target)
        assert there in LAYER, f"add {there} to LAYER in tests/test_layering.py"
        if there == here or (LAYER[there] == LAYER[here] == 9):
            continue
        assert LAYER[there] < LAYER[here], f"{_module(path)} imports {target}: {here} may not import {there}"
