#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs everything, checks generated code, lint,
# types, then runs pytest against real mosquitto and a real OCI registry that the tests start.
#
#   scripts/test.sh [PYTEST ARGS]          everything, at full depth, on PROPELLER_TEST_WORKERS
#                                          processes (2) in one pass (what .ci/run runs)
#   scripts/test.sh --fast [PYTEST ARGS]   the developer's tier: unit + integration tests with
#                                          the `dev` Hypothesis profile, on an installed .venv
#                                          (no setup, lint or type check; no process or fuzz
#                                          tests), on PROPELLER_TEST_WORKERS processes (2;
#                                          `-n 0`: one). See docs/engineering.md, "Tests".
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fast" ]]; then
  shift
  . .venv/bin/activate
  python wasm-client/build.py >/dev/null
  export PROPELLER_HYPOTHESIS_PROFILE="${PROPELLER_HYPOTHESIS_PROFILE:-dev}"
  workers=()
  if python -c "import xdist" 2>/dev/null; then
    workers=(-n "${PROPELLER_TEST_WORKERS:-2}" --dist worksteal)
  else
    echo "pytest-xdist is not installed (scripts/setup.sh installs it): one process" >&2
  fi
  exec python -m pytest -q -p no:cacheprovider -m "unit or integration" "${workers[@]}" "$@"
fi
scripts/setup.sh --system
. .venv/bin/activate
python proto/generate.py --check
ruff check .
ruff format --check .
mypy
python wasm-client/build.py >/dev/null
# Every tier in one pass on two workers (pytest-xdist, worksteal): each worker has its own
# broker, OCI registry and PostgreSQL, every test its own ports (tests/support/ports.py),
# namespaces and directories; the races two workers shook out were fixed where they were.
# The process tier is most of the time: alone after the others it left a core idle.
# docs/engineering.md, "Tests".
exec python -m pytest -q -p no:cacheprovider -n "${PROPELLER_TEST_WORKERS:-2}" --dist worksteal "$@"
