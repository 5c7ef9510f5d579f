"""Multi-process training: two gloo processes under torchrun give the gradients of one process on the
same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import ddp_train  # noqa: E402
import pytest

pytestmark = pytest.mark.slow  # subprocesses or long runs: not in `pytest -m "not slow"`


def test_two_processes_match_one(tmp_path):
    dump = tmp_path / "grads.pt"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "examples" / "ddp_train.py"),
               "--steps", "1", "--batch", "16", "--float64", "--tol", "1e-12", "--dump-grads", str(dump)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    if result.returncode != 0 and "SIGABRT" in result.stderr:
        # Seen once on a heavily loaded 2-core machine (gloo's rendezvous aborting); a real bug fails twice.
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    ddp_grads = torch.load(dump)

    model = ddp_train.make_layer(torch.float64, 1e-12)
    a, target = ddp_train.global_batch(0, 16, torch.float64)
    F.mse_loss(model(a), target).backward()
    single = {n: p.grad for n, p in model.named_parameters()}
    assert set(single) == set(ddp_grads)
    for name, grad in single.items():
        assert torch.allclose(grad, ddp_grads[name], rtol=1e-8, atol=1e-12), name
