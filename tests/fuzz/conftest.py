"""Prints what each fuzzed RPC got (requests, time, status codes) at the end of the run."""

from __future__ import annotations

import pytest

from tests.fuzz.harness import RESULTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RESULTS:
        terminalreporter.write_sep("-", "fuzzed RPCs")
        for line in RESULTS:
            terminalreporter.write_line(line)
