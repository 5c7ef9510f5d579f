"""The solvers' tensor code (what a GPU, other dtypes and FPIDSL_NATIVE=0 run) under the solver tests.

On the CPU the suite's solves run the native kernels where they are built (fpidsl/runtime/native); this runs the
solver, convergence, check-interval and host-synchronisation tests once more with them turned off, so that the
tensor code keeps the whole of its testing on machines without a GPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOLVER_TESTS = ["test_solvers.py", "test_broyden.py", "test_check_interval.py", "test_convergence.py",
                "test_host_syncs.py"]


@pytest.mark.slow
def test_the_solver_tests_pass_with_the_native_kernels_off():
    env = {**os.environ, "FPIDSL_NATIVE": "0"}
    files = [str(ROOT / "tests" / "runtime" / name) for name in SOLVER_TESTS]
    probe = subprocess.run([sys.executable, "-c", "from fpidsl.runtime import native; print(native.status())"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert probe.stdout.strip() == "native kernels not in use: FPIDSL_NATIVE is off", probe.stderr
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
