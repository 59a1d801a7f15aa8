#!/usr/bin/env bash
# Fresh machine -> federated learning running: sets up .venv (no broker, registry or database
# needed: the demo embeds its MQTT broker and keeps state in memory), then runs the demo.
# Extra arguments go to `propeller-fl demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/propeller-fl demo "$@"
