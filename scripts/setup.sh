#!/usr/bin/env bash
# Create .venv and install the project. CPU torch where no GPU is present, the CUDA build otherwise.
#   TORCH_SPEC       torch requirement to install first (default: torch==2.13.0 without a GPU, torch with one)
#   TORCH_INDEX_URL  extra index for torch, e.g. the PyTorch CPU wheel index on a machine without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec=${TORCH_SPEC:-torch}
  else
    spec=${TORCH_SPEC:-torch==2.13.0}
  fi
  echo "setup: installing $spec"
  "${PIP[@]}" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$spec"
fi
echo "setup: installing the project (editable, with dev extras)"
"${PIP[@]}" -e ".[dev]"
touch "$VENV/.installed"
