#!/usr/bin/env bash
# Fresh virtual environment, CPU PyTorch wheel, the package with its test extras, lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy src/lazydp
pytest "$@"
