#!/usr/bin/env bash
# Installs softlabels with the vision extra into ./.venv-vision, then runs the tests of the
# torchvision: and timm: architectures. Extra arguments go to pytest, e.g. bash scripts/test_vision.sh -q
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_vision.sh
# The tests run small models on a few 32x32 images: there, OpenMP threads that wait for each other
# on a busy machine cost ten times the work itself
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Here the extra is installed, so tests/test_vision.py must not skip for want of it
SOFTLABELS_REQUIRE_VISION=1 python -m pytest tests/test_vision.py "$@"
