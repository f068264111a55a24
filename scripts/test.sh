#!/usr/bin/env bash
# Installs softlabels with its test dependencies into ./.venv, then runs the test suite.
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k loader
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
python -m pytest "$@"
