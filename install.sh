#!/usr/bin/env bash
# Creates .venv and installs wordystore with its trainer (the `train` extra) and test tools.
# Torch: $WORDYSTORE_TORCH (default torch==2.13.0, the CPU wheel this project's machines carry); set
# WORDYSTORE_TORCH="" to keep whatever torch pip resolves (or install into an environment that
# already has yours: pip install -e ".[train]").
# Each step says what it does before it starts: pip is quiet, and the torch step takes a minute or two.
set -euo pipefail
cd "$(dirname "$0")"
step() { echo "install.sh: $*"; }

step "1/4 creating the virtual environment .venv"
python3 -m venv .venv
step "2/4 upgrading pip in .venv"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
torch_req="${WORDYSTORE_TORCH-torch==2.13.0}"
if [ -z "$torch_req" ]; then
  step "3/4 torch: left to pip (WORDYSTORE_TORCH is empty)"
elif .venv/bin/python -c "import torch" 2>/dev/null; then
  step "3/4 torch: already installed ($(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
else
  step "3/4 installing $torch_req (the largest download: a minute or two)"
  .venv/bin/python -m pip install -q "$torch_req"
fi
step "4/4 installing wordystore with its trainer and test tools (pip install -e \".[train,test]\")"
.venv/bin/python -m pip install -q -e ".[train,test]"
# wordystore train reuses freed memory under jemalloc where it finds it (docs/trainer.md, "Memory and speed"):
# as root with apt (a container, CI) it is installed here; elsewhere a note says how.
if [ "$(uname)" = Linux ] && [ "${WORDYSTORE_JEMALLOC-}" != none ] && ! ldconfig -p 2>/dev/null | grep -q libjemalloc; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    step "installing jemalloc (apt-get install libjemalloc2): the seed run then peaks near 4 GB instead of 7 GB"
    apt-get install -y -q libjemalloc2 >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libjemalloc2 >/dev/null 2>&1; } ||
      step "note: apt-get could not install libjemalloc2: wordystore train keeps glibc's heap (near 7 GB)"
  else
    step "note: no jemalloc on this machine: wordystore train's seed run peaks near 7 GB instead of 4 GB" \
      "(Debian and Ubuntu: sudo apt-get install libjemalloc2)"
  fi
fi
step "done: run .venv/bin/wordystore --help, or activate it first: source .venv/bin/activate"
