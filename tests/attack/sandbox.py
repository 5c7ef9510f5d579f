"""Run hostile specs with bounded time and memory, each in its own process.

A worker (``python -m tests.attack.sandbox``, a fresh interpreter that imports fpidsl and torch once and
warms them up on a small spec) reads cases as JSON lines and forks one child per case. The child runs under
resource limits: its address space may grow by at most ``memory_mb`` plus the compiler thread's stack
reservation (:mod:`fpidsl.limits`; a hard stop, looser than the bound by up to that reservation) and its CPU
time is limited to ``seconds`` (``RLIMIT_CPU``; CPU time,
so that a busy machine does not fail a case); the worker also kills it after ``WALL_FACTOR`` times that in
wall-clock time (a case that blocks). The child reports its outcome, the CPU seconds it used and the
resident memory it added (``VmHWM`` at the end less ``VmRSS`` at the fork); more than ``memory_mb`` added is
the outcome ``memory``, more than ``seconds`` used is ``timeout``.

Outcomes: ``clean`` (checked clean; with ``run``, also loaded by ``fpidsl.loader.load_module`` from a file, which
checks and compiles it again, and ran forward and backward),
``errors`` (fpidsl errors: kind, line, column, message), ``crash`` (any other exception, with its
traceback), ``timeout``, ``memory`` (``MemoryError`` at the limit) or ``died`` (killed by a signal).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WALL_FACTOR = 6
WARM_UP = ("layer W {\n  input a : [B, 2]\n  state x : [B, 2]\n  param fc : Linear(2, 2)\n"
           "  update x = 0.5 * tanh(fc(x)) + a\n}\n")


@dataclass
class Outcome:
    status: str
    errors: list[tuple[str, int, int, str]] = field(default_factory=list)
    detail: str = ""
    seconds: float = 0.0
    added_mb: float = 0.0


class Sandbox:
    """A worker process; :meth:`run` sends it one case and waits for the outcome."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "tests.attack.sandbox"], cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})

    def run(self, path: str, text: str, run: bool = False, seconds: float = 5.0, memory_mb: int = 500) -> Outcome:
        case = {"path": path, "text": text, "run": run, "seconds": seconds, "memory_mb": memory_mb}
        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the sandbox worker died")
        data = json.loads(line)
        return Outcome(data["status"], [tuple(e) for e in data.get("errors", [])], data.get("detail", ""),
                       data.get("seconds", 0.0), data.get("added_mb", 0.0))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.process.stdout.close()


# --------------------------------------------------------------------------- the worker


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _execute(case: dict) -> dict:
    """In the child: check (and, with ``run``, compile, load, run) the case."""
    import torch

    from fpidsl.loader import load_module
    from fpidsl.compiler import check_source
    from fpidsl.errors import FpiError, FpiErrors, as_list
    from fpidsl.source import Source

    source = Source(case["path"], case["text"])
    try:
        check_source(source)
        if case["run"]:  # through fpidsl.load's own path: a file, checked, compiled and loaded
            with tempfile.TemporaryDirectory(prefix="fpidsl-sandbox-") as folder:
                path = os.path.join(folder, os.path.basename(case["path"]))
                with open(path, "w", encoding="utf-8", newline="") as handle:
                    handle.write(case["text"])
                module = load_module(path)
            for cls in module.LAYERS.values():
                layer = cls().double()
                inputs = [torch.randn(*[2 if isinstance(d, str) else d for d in shape], dtype=torch.float64,
                                      requires_grad=True) for shape in cls.INPUTS.values()]
                out = layer(*inputs)
                outs = out if isinstance(out, tuple) else (out,)
                sum(o.sum() for o in outs).backward()
    except (FpiError, FpiErrors) as exc:
        return {"status": "errors",
                "errors": [(e.kind, e.span.line, e.span.col, e.message) for e in as_list(exc)]}
    except MemoryError:
        return {"status": "memory"}
    except Exception:  # noqa: BLE001 - what the attack looks for
        return {"status": "crash", "detail": traceback.format_exc(limit=-6)}
    return {"status": "clean"}


def _child(case: dict, write_fd: int) -> None:
    from fpidsl.limits import STACK_BYTES

    baseline_rss = _status_kb("VmRSS")
    address_space = _status_kb("VmSize") * 1024 + case["memory_mb"] * 2**20 + STACK_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    cpu = max(1, int(case["seconds"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    try:
        result = _execute(case)
    except MemoryError:
        result = {"status": "memory"}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["seconds"] = usage.ru_utime + usage.ru_stime
    if result["seconds"] > case["seconds"]:
        result = {"status": "timeout", "seconds": result["seconds"]}
    result["added_mb"] = max(0, _status_kb("VmHWM") - baseline_rss) / 1024
    if result["added_mb"] > case["memory_mb"]:
        result = {"status": "memory", "added_mb": result["added_mb"], "seconds": result["seconds"]}
    os.write(write_fd, json.dumps(result).encode())
    os.close(write_fd)


def _run_case(case: dict) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_fd)
        try:
            _child(case, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline = time.monotonic() + WALL_FACTOR * case["seconds"]
    chunks: list[bytes] = []
    os.set_blocking(read_fd, False)
    status = None
    while True:
        try:
            chunk = os.read(read_fd, 65536)
            if chunk:
                chunks.append(chunk)
        except BlockingIOError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return {"status": "timeout", "seconds": case["seconds"]}
        time.sleep(0.005)
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    if chunks:
        return json.loads(b"".join(chunks))
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return {"status": "timeout" if sig == signal.SIGXCPU else "died", "detail": f"signal {sig}"}
    return {"status": "died", "detail": f"exit status {status}"}


def main() -> None:
    import torch  # imported once, before any fork; no torch op runs in the worker, so no thread pools

    torch.set_num_threads(1)
    _execute({"path": "warm.fpi", "text": WARM_UP, "run": True})  # lazy imports and first-call costs, once
    for line in sys.stdin:
        case: dict[str, Any] = json.loads(line)
        print(json.dumps(_run_case(case)), flush=True)


if __name__ == "__main__":
    main()
