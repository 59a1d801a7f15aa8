#!/usr/bin/env bash
# Installs what propeller-fl needs on a fresh Debian/Ubuntu machine: system packages (only for
# the test suite: mosquitto, docker-registry, nats-server, iproute2, postgresql, chromium,
# chromium-driver) and a virtualenv in .venv with the project.
# Usage: scripts/setup.sh [--system]   (--system also installs the Debian packages)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--system" ]]; then
  need=()
  command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto)
  command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
  # `ip` and `tc`: the tests' own hosts (network namespaces) and their links.
  command -v ip >/dev/null 2>&1 || [[ -x /usr/sbin/ip ]] || need+=(iproute2)
  # The clustered broker's tests (tests/support/nats.py): three nodes, JetStream + MQTT.
  command -v nats-server >/dev/null 2>&1 || [[ -x /usr/sbin/nats-server ]] || need+=(nats-server)
  # initdb + postgres: the tests' own PostgreSQL (tests/support/postgres.py).
  command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    || need+=(postgresql)
  # The console's browser test (tests/console): headless Chromium driven through chromedriver.
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
  if ((${#need[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    # policy-rc.d keeps the packages' own daemons from starting: tests start their own.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
