#!/usr/bin/env bash
# Sourced by test_vision.sh (or run): make ./.venv-vision (once) and install softlabels into it with
# the vision extra, torchvision and timm. It is a venv of its own because torchvision releases are
# built against one torch release each: torchvision 0.29 needs torch 2.14, while .venv keeps the CPU
# build of torch 2.13. SOFTLABELS_VISION_VENV picks another folder.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SOFTLABELS_VISION_VENV:-$root/.venv-vision}"
# The core and the test extras exactly as setup.sh installs them, in a subshell so that neither
# variable reaches a later setup.sh of the calling shell
(
  export SOFTLABELS_VENV="$venv" TORCH_SPEC="torch==2.14.1"
  source "$root/scripts/setup.sh"
)
stamp="$venv/.softlabels-vision-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet "torchvision==0.29.1" -e "$root[test,vision]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
