"""Native CPU kernels for the solvers' own arithmetic, built on first use with the system's C compiler.

At the state sizes of a DEQ layer an Anderson or Broyden step is dozens of small tensor operations whose dispatch
costs more than their arithmetic; ``anderson_step.c`` and ``broyden_step.c`` do a step in one call each, and
``judge_step.c`` the iteration loop's judgement of every sample (``fpidsl.runtime.driver``). They are
plain C (no PyTorch headers), so they build in about 2 s (1.90-1.99 s with an empty cache; once: the library is
cached), and are called through :mod:`ctypes` with the tensors' data pointers.

- The library is built once per source, compiler and platform into ``$FPIDSL_CACHE_DIR`` (default
  ``$XDG_CACHE_HOME/fpidsl`` or ``~/.cache/fpidsl``; else ``fpidsl-<uid>`` in the temporary directory; only a
  directory of this user's that others cannot write), written to a temporary name and renamed, so processes that
  build at the same time do not see each other's half-written files.
- ``FPIDSL_NATIVE=0`` turns the kernels off; so does a missing or failing compiler (``$CC``, else Python's own,
  else ``cc``). Then the solvers run their tensor code, which computes the same step; :func:`status` says which
  is used and why.
- The kernels take only what they can run: dense contiguous CPU tensors of float32 or float64 outside any
  torch.func transform or torch.compile tracing (:func:`usable`); everything else runs the tensor code.
- The kernels run on one thread. Where torch may use more (``torch.get_num_threads() > 1``) and a state has more
  than :data:`ONE_THREAD_VALUES` values, the tensor code runs instead: its operations use torch's threads (see
  :func:`worth`).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).parent
SOURCES = (HERE / "anderson_step.c", HERE / "broyden_step.c", HERE / "judge_step.c")
HEADERS = (HERE / "native.h",)
FLAGS = ["-O3", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11"]
_DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_why_not: str | None = None
_loaded = False
_off = 0  # depth of turned_off() blocks
# the largest state (batch x dim values) a kernel takes when torch may use more than one thread: with two threads
# the one-threaded Anderson kernel was slower than the tensor code from 8 x 65536 and 64 x 4096 values on
# (benchmarks/native_kernels.py --threads 2); more threads move that point down
ONE_THREAD_VALUES = 1 << 16


def status() -> str:
    """Whether the native kernels are in use, and if not, why (builds them if they were not built yet)."""
    lib = library()
    if lib is not None:
        return "native kernels in use"
    return "native kernels not in use: " + ("turned off by fpidsl.runtime.native.turned_off()" if _off else _why_not)


@contextlib.contextmanager
def turned_off():
    """Within the block, solves that start run the solvers' tensor code (to compare the two: benchmarks, tests)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it is turned off or cannot be built (the reason: :func:`status`)."""
    global _library, _why_not, _loaded
    if _off:
        return None
    if _loaded:
        return _library
    with _lock:
        if not _loaded:
            try:
                _library = _load()
            except _Unavailable as e:
                _library, _why_not = None, str(e)
            _loaded = True
    return _library


def reset() -> None:
    """Forget the loaded library (tests: the next :func:`library` call looks again at the environment)."""
    global _library, _why_not, _loaded
    with _lock:
        _library, _why_not, _loaded = None, None, False


def usable(*tensors: Tensor, contiguous: bool = True) -> bool:
    """Whether the kernels can take these tensors: dense, contiguous (unless not asked), on the CPU, of one
    float32/float64 dtype, with storage of their own (not under a torch.func transform, not fake or meta), outside
    torch.compile."""
    if torch.compiler.is_compiling():
        return False
    dtype = tensors[0].dtype
    if dtype not in _DTYPES:
        return False
    for t in tensors:
        if (t.dtype != dtype or not t.is_cpu or t.layout != torch.strided
                or (contiguous and not t.is_contiguous()) or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return True


def kernel_for(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library for a solve whose first state and buffers are ``tensors``, where the kernels can take them
    (:func:`usable`, contiguous or not: each step checks its own tensors, and a start such as the expanded
    gradient of a sum is strided while the iterates after it are not); None where the solve runs the tensor code
    throughout."""
    return library() if usable(*tensors, contiguous=False) else None


def takes(kernel: ctypes.CDLL | None, state: Tensor, *others: Tensor) -> bool:
    """Whether a step runs the kernel (``kernel``: the solve's, from :func:`kernel_for`) on the state-sized
    ``state`` and ``others``: it is worth it (:func:`worth`) and they are :func:`usable`."""
    return kernel is not None and worth(state) and usable(state, *others)


def worth(x: Tensor) -> bool:
    """Whether a kernel is worth calling on the state ``x`` rather than the tensor code (one thread, or a state of
    at most :data:`ONE_THREAD_VALUES` values)."""
    return x.numel() <= ONE_THREAD_VALUES or torch.get_num_threads() == 1


def anderson_step(lib: ctypes.CDLL, k: int, s: int, lam: float, tiny: float, slack: float, plain: Tensor, f: Tensor,
                  p_prev: Tensor, f_prev: Tensor, dH: Tensor, dF: Tensor, gram: Tensor, out: Tensor) -> None:
    """One fused Anderson step (see ``anderson_step.c``): writes ring slot ``s`` of ``dH``/``dF``, the Gram row and
    column ``s``, and the next iterate into ``out``. The caller has checked :func:`usable` on every tensor."""
    batch, m, dim = dF.shape
    fn = lib.fpidsl_anderson_step_f32 if plain.dtype == torch.float32 else lib.fpidsl_anderson_step_f64
    pointers = [t.data_ptr() for t in (plain, f, p_prev, f_prev, dH, dF, gram, out)]
    if fn(0, batch, dim, m, k, s, lam, tiny, slack, *pointers) < 0:
        raise RuntimeError(f"fpidsl's native Anderson step refused its arguments (m={m}, k={k}, slot {s})")


def broyden_step(lib: ctypes.CDLL, k: int, x: Tensor, g: Tensor, f: Tensor, x_prev: Tensor, f_prev: Tensor,
                 U: Tensor, S: Tensor, R: Tensor, out: Tensor) -> None:
    """One fused Broyden step with an update (see ``broyden_step.c``): writes slot ``k`` of ``U``/``S`` and row
    ``k`` of ``R`` from the step ``x - x_prev``, and the next iterate into ``out``. The caller has checked
    :func:`usable`."""
    batch, m, dim = U.shape
    fn = lib.fpidsl_broyden_step_f32 if x.dtype == torch.float32 else lib.fpidsl_broyden_step_f64
    pointers = (t.data_ptr() for t in (x, g, f, x_prev, f_prev, U, S, R, out))
    if fn(0, batch, dim, m, k, *pointers) < 0:
        raise RuntimeError(f"fpidsl's native Broyden step refused its arguments (m={m}, k={k})")


# judge_step's flags (judge_step.c)
JUDGE_RELATIVE, JUDGE_LATER, JUDGE_TEST, JUDGE_FLOOR = 1, 2, 4, 8


def judge_step(lib: ctypes.CDLL, flags: int, n: int, constants: tuple[float, float, float, float], x: Tensor,
               g: Tensor, r: Tensor, rows: tuple[Tensor, ...], tracker: tuple[Tensor, ...],
               frozen: Tensor | None = None) -> int:
    """The driver's judgement of iteration ``n`` (see ``judge_step.c``): writes ``r = g - x``, the per-sample
    ``rows`` (step, norm, rel, better, diverged, converged, floor, done) and updates the ``tracker`` in place (best_rel,
    best_step, checked_rel, best_value, best_at, shrank; the best value not for the ``frozen`` rows);
    ``constants``: tol, growth, min_relative_step, floor. Returns how many samples are done. The caller has checked
    :func:`takes` on x, g and the best value (``r`` and the rows are its own, made like x)."""
    batch, dim = x.shape
    fn = lib.fpidsl_judge_step_f32 if x.dtype == torch.float32 else lib.fpidsl_judge_step_f64
    step, norm, rel, better, diverged, converged, floor, done = rows
    best_rel, best_step, checked_rel, best_value, best_at, shrank = tracker
    return fn(batch, dim, flags, n, *constants, x.data_ptr(), g.data_ptr(), r.data_ptr(), step.data_ptr(),
              norm.data_ptr(), rel.data_ptr(), best_rel.data_ptr(), best_step.data_ptr(), checked_rel.data_ptr(),
              best_value.data_ptr(), best_at.data_ptr(), shrank.data_ptr(),
              None if frozen is None else frozen.data_ptr(), better.data_ptr(), diverged.data_ptr(),
              converged.data_ptr(), floor.data_ptr(), done.data_ptr())


def finish_step(lib: ctypes.CDLL, flags: int, n: int, done: Tensor | None, index: Tensor, x: Tensor, g: Tensor,
                verdict: tuple[Tensor, ...], tracker: tuple[Tensor, ...], record: tuple[Tensor, ...], out: Tensor,
                keep: Tensor) -> int:
    """The samples ``done`` (all where None) of iteration ``n`` leave the loop (see ``judge_step.c``): their record
    (iterations, converged, diverged, floor, step, norm, shrank, best_iterate, best_at, residual, best_residual) and
    results (``out``) are written at their batch ``index``; the other rows are written to ``keep``, whose count is
    returned. ``verdict``: residual, step, norm, converged, diverged, floor; ``tracker``: shrank, best_residual,
    best_at, best_value. The caller has checked that every tensor is contiguous, and of the state's dtype where
    it holds values."""
    batch, dim = x.shape
    fn = lib.fpidsl_finish_step_f32 if x.dtype == torch.float32 else lib.fpidsl_finish_step_f64
    return fn(batch, dim, flags, n, None if done is None else done.data_ptr(), index.data_ptr(), x.data_ptr(),
              g.data_ptr(), *(t.data_ptr() for t in verdict), *(t.data_ptr() for t in tracker),
              *(t.data_ptr() for t in record), out.data_ptr(), keep.data_ptr())


def max_m() -> int:
    """The largest Anderson memory the Anderson kernel takes (its small systems live on the C stack); the Broyden
    kernel takes any."""
    lib = library()
    return int(lib.fpidsl_native_max_m()) if lib is not None else 0


class _Unavailable(Exception):
    pass


def _load() -> ctypes.CDLL:
    if os.environ.get("FPIDSL_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise _Unavailable("FPIDSL_NATIVE is off")
    compiler = _compiler()
    texts = [p.read_bytes() for p in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join([*texts, " ".join([compiler, *FLAGS]).encode(), sys.platform.encode(),
                                     sysconfig.get_platform().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"fpidsl_native-{key}{_suffix()}"
    if not target.exists():
        _build(compiler, target)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        raise _Unavailable(f"{target} did not load: {e}") from None
    i64, dbl, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    signatures = {"anderson_step": [i64] * 6 + [dbl] * 3 + [ptr] * 8, "broyden_step": [i64] * 5 + [ptr] * 9,
                  "judge_step": [i64] * 4 + [dbl] * 4 + [ptr] * 18, "finish_step": [i64] * 4 + [ptr] * 27}
    for kernel, argtypes in signatures.items():
        for dtype in ("f32", "f64"):
            fn = getattr(lib, f"fpidsl_{kernel}_{dtype}")
            fn.argtypes, fn.restype = argtypes, i64
    lib.fpidsl_native_max_m.argtypes = []
    lib.fpidsl_native_max_m.restype = i64
    return lib


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc"):
        if candidate:
            found = shutil.which(candidate)
            if found:
                return found
    raise _Unavailable("no C compiler found ($CC, Python's compiler, cc)")


def _cache_dir() -> Path:
    """Where the library is built: ``$FPIDSL_CACHE_DIR``, else ``$XDG_CACHE_HOME/fpidsl`` or ``~/.cache/fpidsl``,
    else ``fpidsl-<uid>`` in the temporary directory; only a directory of this user's that no one else may write
    (a library loaded from a directory others can write into would run their code)."""
    base = os.environ.get("FPIDSL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fpidsl")
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    refused = []
    for path in (Path(base), Path(tempfile.gettempdir()) / f"fpidsl-{uid}"):
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            refused.append(f"{path}: {e.strerror}")
            continue
        why = _unsafe(path)
        if why is None:
            return path
        refused.append(f"{path}: {why}")
    raise _Unavailable("no cache directory to build the kernels in (" + "; ".join(refused) + ")")


def _unsafe(path: Path) -> str | None:
    """Why the library may not be built or loaded in ``path`` (None where it may)."""
    if not os.access(path, os.W_OK):
        return "not writable"
    if hasattr(os, "getuid"):
        info = path.stat()
        if info.st_uid != os.getuid():
            return "owned by another user"
        if info.st_mode & 0o022:
            return "writable by others"
    return None


def _suffix() -> str:
    return ".dll" if sys.platform == "win32" else ".dylib" if sys.platform == "darwin" else ".so"


def _build(compiler: str, target: Path) -> None:
    fd, partial = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-I", str(HERE), "-o", partial, *map(str, SOURCES), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise _Unavailable(f"{compiler} failed to build the kernels: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise _Unavailable(f"{compiler} could not build the kernels: {e}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
