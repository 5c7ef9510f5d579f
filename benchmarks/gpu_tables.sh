#!/usr/bin/env bash
# The GPU tables of issue 18 and the gpu-marked tests, in one short run (budget: about 8 minutes on one GPU).
#
#   benchmarks/gpu_tables.sh --prepare    # here, once: copies the pure-Python packages the GPU machine's image
#                                         # lacks (lark, torchdeq 0.1.0) from .venv into build/gpu_deps/ (ignored)
#   benchmarks/gpu_tables.sh              # on the GPU machine (the device tool: carry ["build/gpu_deps"])
#
# What it runs, each under its own time limit, with the results under $OUT (the device tool brings that folder
# back) or out/gpu_tables/:
#   device.txt           torch, CUDA and the GPU's name (nvidia-smi)
#   gpu_tests.log        pytest -m gpu (tests/runtime/test_gpu.py: solvers, GMRES, a compiled layer and a traced
#                        module on the device against the CPU; one host synchronisation an iteration)
#   BENCHMARKS_GPU.md    benchmarks/run.py --device cuda (the tables of docs/BENCHMARKS.md, 3 repeats, no compile)
#   frontends_gpu.md     benchmarks/frontends.py --device cuda (spec, traced, autograd path, torchdeq)
#   scale_gpu.md, scale_cuda.png   benchmarks/scale.py --device cuda (batch 1-256, images 16-128)
# Record the tables in docs/BENCHMARKS.md with the device's name from device.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
DEPS=build/gpu_deps

if [ "${1:-}" = "--prepare" ]; then
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -rf "$DEPS" && mkdir -p "$DEPS"
  for package in lark torchdeq; do cp -r "$site/$package" "$DEPS/"; done
  echo "prepared $DEPS: $(ls "$DEPS" | tr '\n' ' ')"
  exit 0
fi

PY=${PYTHON:-python3}
RESULTS=${OUT:-out/gpu_tables}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD:$PWD/$DEPS${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=0

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" > "$RESULTS/device.txt" \
  || { cat "$RESULTS/device.txt"; echo "no CUDA device: nothing to run"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$RESULTS/device.txt" 2>&1 || true
cat "$RESULTS/device.txt"
# fpidsl reads its grammar as package data (fpidsl.grammars): install the checkout, without dependencies or network
$PY -c "import fpidsl.grammars" 2>/dev/null || $PY -m pip install --quiet --no-deps --no-build-isolation -e . \
  || { echo "could not install the checkout"; exit 1; }

step() {  # step SECONDS OUTPUT COMMAND...: run one part under its limit, keep its output, go on if it fails
  local limit=$1 output=$2; shift 2
  echo "== $* (limit ${limit}s) -> $output"
  if ! timeout "$limit" "$@" > "$RESULTS/$output" 2>&1; then
    echo "   FAILED or timed out; the end of its output:"; tail -n 20 "$RESULTS/$output"; failed=1
  fi
}

step 150 gpu_tests.log $PY -m pytest -q -m gpu -p no:cacheprovider tests/runtime/test_gpu.py -rs
step 240 run_gpu.log $PY benchmarks/run.py --device cuda --repeats 3 --no-compile --out "$RESULTS/BENCHMARKS_GPU.md"
step 100 frontends_gpu.md $PY benchmarks/frontends.py --device cuda --repeats 3
step 100 scale_gpu.md $PY benchmarks/scale.py --device cuda --plot "$RESULTS/scale_cuda.png"
tail -n 3 "$RESULTS/gpu_tests.log"
exit $failed
