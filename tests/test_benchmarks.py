"""The benchmark's quick mode runs and writes its tables (times are not asserted: they are measurements)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses or long runs: not in `pytest -m "not slow"`

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torchdeq", reason="the benchmark compares against torchdeq 0.1.0 (pip install torchdeq==0.1.0)")


def _load_run():
    spec = importlib.util.spec_from_file_location("fpidsl_benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore")
def test_quick_benchmark_writes_every_table(tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    assert _load_run().main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("## 1. fpidsl against torchdeq", "## 2. fpidsl against unrolled", "## 3. The cost floor",
                    "## 4. The cost of the language", "## 5. Peak memory", "## 6. The solver's own cost"):
        assert heading in text
    assert "| conv16-slow | picard |" in text and "| bibtex-nn | anderson |" in text
    assert "**NO**" not in text  # every contender reached its tolerances
    assert text.rstrip().endswith("<!-- notes -->")


@pytest.mark.filterwarnings("ignore")
def test_native_kernels_benchmark_compares_kernel_and_tensor_code():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "native_kernels.py"), "bibtex-nn", "conv16-slow",
                           "--quick"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| bibtex-nn", "| conv16-slow", "| 4x8"))]
    assert len(rows) == 7, proc.stdout  # two workloads x (picard, anderson, broyden), one cheap-map state
    assert "(differ)" not in proc.stdout  # the kernel and the tensor code take the same iterations


def test_profile_step_prints_both_profiles():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "bibtex-nn", "picard",
                           "--quick", "--steps", "2", "--rows", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "bibtex-nn picard: median step" in proc.stdout
    assert "Self CPU" in proc.stdout and "tottime" in proc.stdout


@pytest.mark.filterwarnings("ignore")
def test_profile_step_groups_by_input_shape():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "bibtex-nn", "picard",
                           "--quick", "--steps", "2", "--rows", "5", "--shapes"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Input Shapes" in proc.stdout and "[[" in proc.stdout


def test_profile_step_splits_the_step_by_part():
    import re
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "bibtex-nn", "anderson",
                           "--quick", "--steps", "2", "--parts"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = dict(re.findall(r"\| ([A-Za-z (),]+) \| (-?[\d.]+) \| [\d.-]+ \|", proc.stdout))
    assert set(rows) == {"evaluations (g, VJP)", "solver steps", "judgement", "rest of the loops",
                         "outside the loops", "step"}, proc.stdout
    assert float(rows["solver steps"]) > 0 and float(rows["evaluations (g, VJP)"]) > 0  # the wrappers were called
    assert float(rows["evaluations (g, VJP)"]) + float(rows["solver steps"]) < float(rows["step"])
    assert "Self CPU" not in proc.stdout  # no profiler


def test_kernel_measurements_run():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ratio") == 9  # one line a pair of forms (the last: grid_sample's grid gradient)


def test_precision_floor_measurement_runs_and_the_floor_covers_the_shipped_conv_layers():
    import re
    import subprocess

    from fpidsl.runtime.driver import FLOOR_FACTOR

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "precision_floor.py")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    worst = [float(v) for v in re.findall(r"([\d.]+) eps \(max\)", proc.stdout)]
    assert len(worst) == 6  # three layers, two weight scales
    assert max(worst) < FLOOR_FACTOR  # their rounding noise is below the floor: they stop there, not at max_iter


@pytest.mark.filterwarnings("ignore")
def test_toolkit_benchmark_memory_table_runs(capsys):
    spec = importlib.util.spec_from_file_location("fpidsl_benchmarks_toolkit", ROOT / "benchmarks" / "toolkit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--only", "memory"]) == 0
    out = capsys.readouterr().out
    assert "| 30 |" in out and "| 300 |" in out


def test_compile_time_benchmark_runs():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_time.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "chain of lets" in proc.stdout and "nested calls" in proc.stdout


def test_backward_narrowing_benchmark_runs_and_both_forms_agree():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "backward_narrowing.py"), "--batch", "8",
                           "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "both forms agree" in proc.stdout


def test_capture_cost_benchmark_runs():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "capture_cost.py"), "--repeats", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "capture='auto'" in proc.stdout and "discover" in proc.stdout


def test_frontends_benchmark_runs_and_the_traced_module_gives_the_specs_gradients():
    import re
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frontends.py"), "--quick", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for workload in ("conv16-slow", "bibtex-nn"):
        for method in ("picard", "anderson"):
            assert f"| {workload} | {method} | yes |" in proc.stdout  # the module traces
    number = r"(\d\.\de[+-]\d\d)"
    checks = re.findall(rf"\| yes \| {number} \| {number} \| {number} \|", proc.stdout)
    assert len(checks) == 4  # every contender reached its tolerances on every row
    assert all(float(traced) < 1e-6 and float(plain) < 1e-5 and float(deq) < 1e-4 for traced, plain, deq in checks)


def test_frontends_benchmark_runs_the_chosen_workloads_and_methods():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "frontends.py"), "--quick", "--repeats", "1",
                           "--workloads", "bibtex-nn", "--methods", "anderson"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| bibtex-nn | anderson | yes |" in proc.stdout
    assert "| picard |" not in proc.stdout and "conv16-slow" not in proc.stdout


def test_scale_benchmark_writes_its_table_and_plot(tmp_path):
    import subprocess

    png = tmp_path / "scale.png"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--repeats", "1",
                           "--methods", "picard", "--plot", str(png)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("| picard |") == 4  # two batch sizes, two image sides
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_with_device_cuda_says_when_there_is_no_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: benchmarks/gpu_tables.sh runs the GPU tables")
    with pytest.raises(SystemExit):
        _load_run().main(["--quick", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_floor_benchmark_prints_table_3_for_a_chosen_workload():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "floor.py"), "bibtex-nn", "--methods", "picard",
                           "--repeats", "1", "--clock", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| bibtex-nn | picard | 5 x" in proc.stdout and "cpu clock" in proc.stdout
    assert "least history work" not in proc.stdout  # Picard has no history


def test_floor_benchmark_adds_andersons_least_history_work_to_its_rows():
    import re
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "floor.py"), "bibtex-nn", "--methods",
                           "anderson", "--repeats", "1", "--clock", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    floor = re.search(r"\| bibtex-nn \| anderson \| (\d+) x [\d.]+ \| (\d+) x [\d.]+ \| [\d.]+ \| ([\d.]+) \|",
                      proc.stdout)
    history = re.search(r"\| bibtex-nn \| 32 x 159 \| (\d+) x ([\d.]+) \| ([\d.]+) \|", proc.stdout)
    assert floor and history, proc.stdout
    steps = int(floor.group(1)) - 1 + int(floor.group(2)) - 1
    assert int(history.group(1)) == steps
    assert float(history.group(3)) >= float(floor.group(3))  # the floor plus the history work


def test_floor_benchmark_adds_broydens_least_history_work_to_its_rows():
    import re
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "floor.py"), "bibtex-nn", "--methods",
                           "broyden", "--repeats", "1", "--clock", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    floor = re.search(r"\| bibtex-nn \| broyden \| \d+ x [\d.]+ \| \d+ x [\d.]+ \| [\d.]+ \| ([\d.]+) \|", proc.stdout)
    history = re.search(r"\| bibtex-nn \| 32 x 159 \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \|", proc.stdout)
    assert floor and history and "Broyden's least history work" in proc.stdout, proc.stdout
    assert float(history.group(1)) > 0  # the solves held updates after their second iteration
    assert float(history.group(2)) >= float(floor.group(1))  # the floor plus the history work


def test_broyden_kernel_benchmark_times_the_kernel_against_the_least_history_work():
    import re
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "broyden_kernel.py"), "--dim", "300", "--m", "8",
                           "--held", "2", "5", "--repeats", "2", "--evict-mb", "1"], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 1 and "native kernels not in use" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"\| (\d+) \| (hot|cold) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", proc.stdout)
    assert rows == [("2", "hot"), ("2", "cold"), ("5", "hot"), ("5", "cold")], proc.stdout


def test_solver_ops_counts_every_method():
    import re
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "solver_ops.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = dict(re.findall(r"\| (picard|anderson|broyden) \| ([\d.]+) \|", proc.stdout))
    assert set(rows) == {"picard", "anderson", "broyden"}
    assert float(rows["picard"]) < float(rows["anderson"])  # Anderson's step is work Picard does not do


def test_dropout_mask_benchmark_runs():
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dropout_mask.py"), "--repeats", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reused" in proc.stdout


def test_eval_in_loop_benchmark_times_the_loops_evaluations_against_the_floors():
    import re
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_in_loop.py"), "bibtex-nn", "--methods",
                           "picard", "anderson", "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^\| (picard|anderson) \| 0 \| ([\d.]+) / ([\d.]+) \| ([\d.]+) / ([\d.]+) \| "
                      r"([\d.]+) / ([\d.]+) \| ([\d.]+) / ([\d.]+) \|$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["picard", "anderson"], proc.stdout
    for row in rows:  # the ratios are of the unrounded times: within the rounding of the milliseconds shown
        loop_g, loop_vjp, alone_g, alone_vjp, cold_g, cold_vjp, ratio_g, ratio_vjp = map(float, row[1:])
        assert min(loop_g, loop_vjp, alone_g, alone_vjp, cold_g, cold_vjp) > 0
        assert abs(ratio_g - loop_g / alone_g) <= 0.01 + 0.01 / alone_g * (1 + ratio_g)
        assert abs(ratio_vjp - loop_vjp / alone_vjp) <= 0.01 + 0.01 / alone_vjp * (1 + ratio_vjp)


def test_a_step_takes_the_specs_settings_with_its_methods_not_the_last_steps():
    """A Broyden step made after an Anderson step on the same layer keeps Broyden's default memory (50): the
    settings are the spec's with the method's on top, never the layer's current ones (an Anderson m = 6 had
    carried over, silently: every Broyden row measured after an Anderson row ran with m = 6)."""
    run = _load_run()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from workloads import make_workloads

    w = make_workloads(True, ["bibtex-nn"])[0]
    anderson = run.fpidsl_step(w, "anderson", run.Outcome())
    anderson()
    assert w.layer.solve_settings.memory == 6
    broyden = run.fpidsl_step(w, "broyden", run.Outcome())
    broyden()
    assert w.layer.solve_settings.method == "broyden" and w.layer.solve_settings.memory == 50
    assert w.layer.backward_settings.method == "broyden" and w.layer.backward_settings.memory == 50
    anderson()  # alternating steps set their own settings again
    assert w.layer.solve_settings.memory == 6 and w.layer.backward_settings.memory == 6


def test_fixed_cost_benchmark_counts_and_times_every_method(capsys):
    spec = importlib.util.spec_from_file_location("fpidsl_benchmarks_fixed_cost", ROOT / "benchmarks" / "fixed_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--steps", "3", "--repeats", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert [r[0].strip() for r in rows] == ["picard", "anderson", "broyden"]
    for r in rows:
        assert int(r[2]) > 100 and float(r[3]) > float(r[4]) > 0  # calls a step; the step costs more than its floor
