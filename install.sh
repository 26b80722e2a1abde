#!/usr/bin/env bash
# Creates .venv and installs wordystore with its trainer (the `train` extra) and test tools.
# Torch: $WORDYSTORE_TORCH (default torch==2.13.0, the CPU wheel this project's machines carry); set
# WORDYSTORE_TORCH="" to keep whatever torch pip resolves (or install into an environment that
# already has yours: pip install -e ".[train]").
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
torch_req="${WORDYSTORE_TORCH-torch==2.13.0}"
if [ -n "$torch_req" ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$torch_req"
fi
.venv/bin/python -m pip install -q -e ".[train,test]"
