"""The fuzz modules' shared environment, and a summary of what each fuzzed RPC got (requests,
time, status codes) at the end of the run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fuzz.harness import RESULTS, FuzzEnv, fuzz_env
from tests.support.infra import Mosquitto


@pytest.fixture(scope="module")
async def env(
    broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory, seed_image_registry: str
) -> AsyncIterator[FuzzEnv]:
    """One Stack with the known-good state per test module (a module may add to it by
    overriding this fixture)."""
    async with fuzz_env(broker, tmp_path_factory, seed_image_registry) as e:
        yield e


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RESULTS:
        terminalreporter.write_sep("-", "fuzzed RPCs")
        for line in RESULTS:
            terminalreporter.write_line(line)
