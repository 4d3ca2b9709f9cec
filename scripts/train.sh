#!/usr/bin/env bash
# Fresh virtual environment, CPU PyTorch wheel, the package; then the main job on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e .
lazydp train "$@"
