#!/usr/bin/env bash
# Set up .venv for fpidsl on a fresh clone: the CPU build of torch, then fpidsl (editable) with its
# dev and examples extras. Idempotent and quiet; safe to run before every command.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fpidsl-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# torch first, pinned: a bare `torch` (or an open range) would pull a multi-GB CUDA build on a CPU machine.
pip install "torch==2.13.0"
.venv/bin/python -c "import torch" 2>/dev/null || { echo "setup: torch==2.13.0 did not install" >&2; exit 1; }
pip install -e ".[dev,examples]"
# torchdeq 0.1.0, the competitor in benchmarks/ (no deps: it must not touch the pinned torch).
pip install --no-deps "torchdeq==0.1.0"
# the lightning extra, for examples/lightning_box.py and its test (no deps: they must not touch the pinned torch;
# what they import besides torch is already installed: fsspec, packaging, PyYAML, tqdm, typing_extensions, numpy).
pip install --no-deps "pytorch-lightning==2.6.6" "lightning-utilities==0.15.3" "torchmetrics==1.9.0"
.venv/bin/python -c "import fpidsl, lark, networkx, yaml, pytest, hypothesis, matplotlib, tqdm, skimage, pywt, sklearn" || { echo "setup: fpidsl did not install" >&2; exit 1; }
.venv/bin/python -c "import pytorch_lightning" || { echo "setup: pytorch-lightning did not install" >&2; exit 1; }
echo "$want" > "$stamp"
