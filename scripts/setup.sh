#!/usr/bin/env bash
# Fresh machine → .venv with cpt-lightning installed, CPU torch pinned.
# Why pinned: an unpinned torch makes pip pull several GB of CUDA wheels on a CPU box.
# Why the CPU index: PyPI's Linux torch is the CUDA build too; where pip's own configuration already
# offers a +cpu wheel of that version (the project's machines: a local wheel folder) it is used as it is.
# TORCH_INDEX_URL=... names another index (e.g. a CUDA one, for a GPU machine).
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
torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  torch_index=(--index-url "$TORCH_INDEX_URL")
elif [ "$(uname -s)" = Linux ]; then
  resolved=$(.venv/bin/pip install --dry-run -q --ignore-installed --report - "torch==${TORCH_VERSION}" 2>/dev/null |
    .venv/bin/python -c "import json, sys; print(*[i['metadata']['version'] for i in json.load(sys.stdin)['install'] if i['metadata']['name'] == 'torch'])" 2>/dev/null || true)
  [[ "$resolved" == *+cpu ]] || torch_index=(--index-url https://download.pytorch.org/whl/cpu)
fi
echo "torch ${TORCH_VERSION}: ${torch_index[*]:-${resolved:-} as pip is configured}"
.venv/bin/pip install -q -c "$constraint" ${torch_index[@]+"${torch_index[@]}"} "torch==${TORCH_VERSION}"  # bash < 4.4: set -u
.venv/bin/pip install -q -c "$constraint" -e ".[test]"
.venv/bin/pip uninstall -q -y torchvision 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, litdata, lightning; print(f'ready: torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}, litdata {litdata.__version__}')"
