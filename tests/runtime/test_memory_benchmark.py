"""The memory benchmark's quick mode runs, prints its table and passes its own 10% check (no timing asserted)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "memory.py"


@pytest.mark.slow
def test_memory_benchmark_quick():
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = dict(
        ((kind, int(n)), float(mib))
        for kind, n, mib in re.findall(r"^(fpidsl|unrolled)\s+(\d+)\s+([\d.]+)", result.stdout, re.MULTILINE)
    )
    assert set(rows) == {("fpidsl", 20), ("fpidsl", 400), ("unrolled", 20), ("unrolled", 400)}, result.stdout
    assert abs(rows["fpidsl", 400] - rows["fpidsl", 20]) <= 0.1 * rows["fpidsl", 20]
    assert rows["unrolled", 400] > 5 * rows["unrolled", 20]  # the baseline does grow: the measurement sees it
    assert "(limit 10%) OK" in result.stdout
