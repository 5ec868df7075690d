#!/usr/bin/env bash
# Fresh machine → .venv with cpt-lightning installed, CPU torch pinned.
# Why pinned: an unpinned torch makes pip pull several GB of CUDA wheels on a CPU box.
# Why torchvision is removed: litdata pulls it in, and PyPI's CUDA torchvision next to CPU torch
# breaks `import transformers` (operator torchvision::nms does not exist). Nothing here uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
[ -d .venv ] || "$PYTHON" -m venv .venv
constraint="$(mktemp)"; trap 'rm -f "$constraint"' EXIT
echo "torch==${TORCH_VERSION}" > "$constraint"
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c "$constraint" "torch==${TORCH_VERSION}"
.venv/bin/pip install -q -c "$constraint" -e ".[test]"
.venv/bin/pip uninstall -q -y torchvision 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, litdata, lightning; print(f'ready: torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}, litdata {litdata.__version__}')"
