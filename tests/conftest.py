"""Shared fixtures: paths of the repository and its shipped specs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every compile in the suite lints every graph after every lowering pass (fpidsl/passes/lower.py).
os.environ["FPIDSL_LINT_PASSES"] = "1"

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"


def shipped_specs() -> list[Path]:
    """Every spec shipped in specs/, .fpi and YAML."""
    return sorted(p for p in SPECS.iterdir() if p.suffix in (".fpi", ".yaml", ".yml"))


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def device():
    """The CUDA device for the tests marked ``gpu`` (``benchmarks/gpu_tables.sh`` runs them); skips without one."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (the gpu-marked tests run where one is: benchmarks/gpu_tables.sh)")
    return torch.device("cuda")


def _one_thread() -> None:
    """The suite's tensors are small: one intra-op thread is faster, and immune to a busy machine
    (with 2 threads on a loaded 2-core machine a tiny matmul was measured at 24 ms instead of 0.01 ms)."""
    import torch

    torch.set_num_threads(1)


_one_thread()
