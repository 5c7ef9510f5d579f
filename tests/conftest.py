"""Shared fixtures: paths of the repository and its shipped specs."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def shipped_specs() -> list[Path]:
    """Every spec shipped in specs/, .fpi and YAML."""
    return sorted(p for p in SPECS.iterdir() if p.suffix in (".fpi", ".yaml", ".yml"))


@pytest.fixture
def root() -> Path:
    return ROOT
