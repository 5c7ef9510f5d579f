"""The wheel ships the grammar: build it, install it (not editable) into a fresh venv, run `fpidsl check`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _not_in_a_fresh_clone(folder: str, names: list[str]) -> set[str]:
    top = {".git", ".venv", "build", "dist", "out", ".pytest_cache", ".hypothesis"} if Path(folder) == ROOT else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}


def test_wheel_installs_and_checks_a_spec(tmp_path):
    dist = tmp_path / "dist"
    # Built from a copy of the checkout: a build in place writes build/ and rewrites fpidsl.egg-info/ in the
    # repository, which the other test processes of a parallel run (pytest -n) read as fpidsl's metadata (the
    # pygments entry point) while it is being written. The copy leaves out what a fresh clone does not have.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_not_in_a_fresh_clone)
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)],
        check=True, capture_output=True, text=True,
    )
    wheels = list(dist.glob("fpidsl-*.whl"))
    assert len(wheels) == 1
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # The wheel with its declared dependencies; torch pinned to the CPU build this machine has on disk.
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(constraints),
         str(wheels[0])],
        check=True, capture_output=True, text=True,
    )
    spec = tmp_path / "box.fpi"
    spec.write_text((ROOT / "specs" / "box_projection.fpi").read_text())
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(env_dir / "bin" / "fpidsl"), "check", str(spec)],
                            capture_output=True, text=True, cwd=tmp_path, env=clean_env)
    assert result.returncode == 0, result.stderr
    assert "ok (2 layers: BoxProjectionNN, BoxProjectionGD)" in result.stdout
    # and it is the installed copy that ran, grammar included
    where = subprocess.run([str(py), "-c", "import fpidsl.grammars as g; print(g.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=clean_env)
    assert str(env_dir) in where.stdout
