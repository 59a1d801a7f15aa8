"""`python -m proplet` as compose runs it: configured from the environment, serving tasks
until SIGTERM, then exiting cleanly, and staying within its limits whatever a module does."""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from server.messages import COMPLETED, FAILED
from server.topics import Topics
from tests.proplet import wat
from tests.proplet.conftest import ManagerProbe
from tests.support.infra import Mosquitto
from tests.support.processes import ChildProcess, started
from tests.support.security import proplet_tls, tls_env
from tests.support.waits import eventually

ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def proplet_process(
    broker: Mosquitto, topics: Topics, probe: ManagerProbe, work: Path, **settings: str
) -> AsyncIterator[tuple[ChildProcess, str]]:
    """`python -m proplet` with `settings` (PROPLET_* variables), announced to `probe`; its
    stdin is a pipe that stays open and silent (a module that could read it would wait).
    Killed on the way out if it is still running."""
    proplet_id = f"proc-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        **tls_env(proplet_tls(proplet_id)),
        "PROPLET_ID": proplet_id,
        "PROPLET_HEARTBEAT_S": "0.2",
        "PROPLET_WORK_DIR": str(work),
        "PROPELLER_MQTT_PORT": str(broker.port),
        "PROPELLER_DOMAIN_ID": topics.domain,
        "PROPELLER_CHANNEL_ID": topics.channel,
        **settings,
    }
    argv = [sys.executable, "-m", "proplet"]
    process = ChildProcess("proplet", argv, work.parent / "logs", env=env, cwd=ROOT, stdin="pipe")
    with started(process):
        await probe.wait_until(lambda: any(a.proplet_id == proplet_id for a in probe.created))
        yield process, proplet_id


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def test_entry_point_serves_tasks_until_sigterm(
    broker: Mosquitto, topics: Topics, probe: ManagerProbe, tmp_path: Path
) -> None:
    async with proplet_process(broker, topics, probe, tmp_path / "work") as (proc, proplet_id):
        result = await probe.run(wat.hello(), proplet_id=proplet_id)
        assert (result.state, result.results) == (COMPLETED, "hello from wasm\n")
        assert await proc.terminate_async(20) == 0, proc.tail()
    assert "stopped" in proc.log_text(), proc.tail()


MEMORY_LIMIT = 64 << 20


async def test_memory_stays_within_the_limit_whatever_the_module_declares(
    broker: Mosquitto, topics: Topics, probe: ManagerProbe, tmp_path: Path
) -> None:
    """Issue 10: a module with 8 memories just under the cap each took a proplet to 2.1 GB.
    Here 8 x 62.5 MiB, every page written: 500 MiB if it ran."""
    settings = {"PROPLET_MEMORY_LIMIT_MB": "64", "PROPLET_TASK_TIMEOUT_S": "30"}
    async with proplet_process(broker, topics, probe, tmp_path / "work", **settings) as (
        proc,
        proplet_id,
    ):
        assert (await probe.run(wat.hello(), proplet_id=proplet_id)).state == COMPLETED
        before = peak_rss(proc.pid)

        many = await probe.run(wat.many_memories(8, 1000), proplet_id=proplet_id)
        assert many.state == FAILED
        assert many.error.startswith(
            "memory limit exceeded: the module needs 8 linear memories, a task may have 1"
        ), many.error
        # One memory grown to the cap, every page written: the most a task can take.
        hog = await probe.run(wat.memory_hog(), proplet_id=proplet_id)
        assert hog.state == FAILED and hog.error.startswith("memory limit exceeded ("), hog.error

        assert (await probe.run(wat.hello(), proplet_id=proplet_id)).state == COMPLETED
        grown = peak_rss(proc.pid) - before
        assert grown < 2 * MEMORY_LIMIT, f"peak RSS grew by {grown >> 20} MiB"


async def test_no_host_call_outlives_its_task(
    broker: Mosquitto, topics: Topics, probe: ManagerProbe, tmp_path: Path
) -> None:
    """Issue 10: a module sleeping in a host call was failed at its deadline, but its thread
    lived on for the whole sleep. Here the proplet's stdin is an open pipe that never speaks,
    and modules sleep for an hour with a 1 s task timeout."""
    settings = {"PROPLET_TASK_TIMEOUT_S": "1"}
    async with proplet_process(broker, topics, probe, tmp_path / "work", **settings) as (
        proc,
        proplet_id,
    ):
        calls = await probe.run(wat.host_calls(), proplet_id=proplet_id)
        assert calls.state == COMPLETED, calls.error
        answers = wat.parse_host_calls(calls.results.encode())
        assert (answers["stdin_read_errno"], answers["stdin_read_bytes"]) == (0, 0)
        assert (answers["poll_errno"], answers["poll_events"]) == (0, 1)
        baseline = thread_count(proc.pid)

        async def threads() -> int:
            return thread_count(proc.pid)

        for _ in range(5):
            slept = await probe.run(wat.sleeper(3600), proplet_id=proplet_id)
            assert (slept.state, slept.error) == (FAILED, "deadline exceeded after 1s")
            await eventually(
                threads, lambda n: n <= baseline, timeout=10, what="threads back to baseline"
            )
        assert (await probe.run(wat.hello(), proplet_id=proplet_id)).state == COMPLETED
