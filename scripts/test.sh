#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs everything, checks generated code, lint,
# types, then runs pytest against real mosquitto and a real OCI registry that the tests start.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --system
. .venv/bin/activate
python proto/generate.py --check
ruff check .
ruff format --check .
mypy
python wasm-client/build.py >/dev/null
python -m pytest -q -p no:cacheprovider "$@"
