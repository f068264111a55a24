#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: make ./.venv (once) and install softlabels into it.
# TORCH_SPEC picks the PyTorch build; the default is the CPU build that the tests and CI use.
# With a GPU, set it to a CUDA build, e.g. TORCH_SPEC='torch==2.13.0' with the matching index.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SOFTLABELS_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.softlabels-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
  "$venv/bin/python" -m pip install --quiet -e "$root[test,lm,tensorboard]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
