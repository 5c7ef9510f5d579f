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
    (with 2 threads on a loaded 2-core machine a tiny matmul was measured at 24 ms instead of 0.01 ms).
    Every process of a parallel run (``pytest -n``, pytest-xdist) imports this file: one thread each."""
    import torch

    torch.set_num_threads(1)


_one_thread()


@pytest.fixture(autouse=True)
def _torch_global_state():
    """Each test starts with the process's torch settings, whatever the tests before it in that process did: with
    ``pytest -n`` which tests share a process, and in which order, varies from run to run. (PyTorch Lightning's
    ``Trainer(deterministic=True)``, tests/test_lightning.py, turned on deterministic algorithms for the rest of
    the process.) The tests that change a setting on purpose restore it themselves."""
    import torch

    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def pytest_collection_modifyitems(config, items):
    """In a parallel run (a pytest-xdist worker), the tests marked slow go first, in their order, the rest after,
    in theirs: a run of seconds-long tests left for the end keeps one process busy while the other idles. Every
    worker sorts alike (xdist requires it); a serial run keeps the files' order."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
