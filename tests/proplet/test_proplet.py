"""A proplet on a real broker, driven the way the manager drives it: task starts and stops in,
announcements, heartbeats and task results out."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from pathlib import Path

import pytest

from proplet import Proplet, PropletConfig, WasmRuntime
from server.messages import COMPLETED, FAILED, INTERRUPTED, RUNNING, TaskStart
from tests.proplet import wat
from tests.proplet.conftest import ManagerProbe, with_changes


async def test_announces_itself_with_metadata(
    proplet_config: PropletConfig, probe: ManagerProbe
) -> None:
    async with Proplet(proplet_config):
        await probe.wait_until(lambda: bool(probe.created))
    announce = probe.created[0]
    assert announce.proplet_id == proplet_config.proplet_id
    assert announce.name == "test-proplet"
    assert announce.metadata["runtime"] == "wasmtime"
    for key in ("os", "arch", "python", "wasmtime"):
        assert announce.metadata[key]


async def test_runs_a_task_and_reports_running_then_completed(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    result = await probe.run(wat.hello())
    assert result.state == COMPLETED
    assert result.results == "hello from wasm\n"
    assert result.proplet_id == proplet.proplet_id
    assert probe.states(result.task_id) == [RUNNING, COMPLETED]


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (wat.trap(), "trap: wasm `unreachable` instruction executed"),
        (wat.infinite_loop(), "deadline exceeded after 1s"),
        (wat.memory_hog(), "memory limit exceeded"),
        (wat.exit_with(3, b"bad input\n"), "exit status 3: bad input"),
        (wat.flood(4096, 100), "output too large"),
        (b"\0asm but not really", "invalid wasm module"),
    ],
    ids=["trap", "infinite-loop", "memory-grow", "exit-3", "output-flood", "garbage"],
)
async def test_a_failing_task_is_reported_and_the_next_one_runs(
    proplet: Proplet, probe: ManagerProbe, module: bytes, reason: str
) -> None:
    failed = await probe.run(module)
    assert failed.state == FAILED
    assert failed.error.startswith(reason), failed.error
    assert probe.states(failed.task_id) == [RUNNING, FAILED]
    after = await probe.run(wat.hello())
    assert (after.state, after.results) == (COMPLETED, "hello from wasm\n")


async def test_invalid_json_output_of_an_ordinary_task_is_its_result(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    # Only round tasks must print a JSON update; an ordinary task's stdout is its result.
    result = await probe.run(wat.printing(b"{not json", exit_code=0))
    assert (result.state, result.results) == (COMPLETED, "{not json")


async def test_non_utf8_output_is_replaced_not_fatal(proplet: Proplet, probe: ManagerProbe) -> None:
    result = await probe.run(wat.printing(b"ok \xff\xfe", exit_code=0))
    assert result.state == COMPLETED
    assert result.results.startswith("ok ")


async def test_env_and_cli_args_reach_the_module(proplet: Proplet, probe: ManagerProbe) -> None:
    result = await probe.run(
        wat.env_dump(), env={"GREETING": "hi", "N": "3"}, cli_args=["--fast"], name="dump"
    )
    assert result.state == COMPLETED
    env, args = wat.parse_env_dump(result.results.encode())
    assert env == {"GREETING": "hi", "N": "3"}
    assert args == ["dump", "--fast"]


async def test_module_from_a_local_file(
    proplet: Proplet, probe: ManagerProbe, tmp_path: Path
) -> None:
    path = tmp_path / "hello.wasm"
    path.write_bytes(wat.hello())
    ok = await probe.run(image_url=f"file://{path}")
    assert (ok.state, ok.results) == (COMPLETED, "hello from wasm\n")
    missing = await probe.run(image_url=f"file://{tmp_path / 'nope.wasm'}")
    assert missing.state == FAILED
    assert "cannot read" in missing.error and "nope.wasm" in missing.error


async def test_task_without_a_module_fails(proplet: Proplet, probe: ManagerProbe) -> None:
    result = await probe.run()
    assert result.state == FAILED
    assert "neither" in result.error or "both empty" in result.error


async def test_tasks_for_other_proplets_are_ignored_broadcasts_run(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    other = await probe.start(wat.hello(), proplet_id="someone-else")
    mine = await probe.start(wat.printing(b"mine"), proplet_id=proplet.proplet_id)
    broadcast = await probe.start(wat.printing(b"everyone"))
    assert (await probe.result(mine)).results == "mine"
    assert (await probe.result(broadcast)).results == "everyone"
    # Starts are handled in order: by now the first one would have been reported if taken.
    assert probe.states(other) == []


async def test_two_proplets_share_broadcast_work_but_not_addressed_work(
    proplet_config: PropletConfig, probe: ManagerProbe
) -> None:
    second = with_changes(proplet_config, proplet_id=f"proplet-{uuid.uuid4().hex[:8]}")
    async with Proplet(proplet_config) as a, Proplet(second) as b:
        task = await probe.start(wat.hello(), proplet_id=b.proplet_id)
        result = await probe.result(task)
        assert result.proplet_id == b.proplet_id
        assert a.proplet_id not in {r.proplet_id for r in probe.results}


async def test_malformed_payloads_are_dropped(proplet: Proplet, probe: ManagerProbe) -> None:
    topics = probe.topics
    await probe.publish_raw(topics.task_start, b"{not json")
    await probe.publish_raw(topics.task_start, b'{"id": 5}')
    await probe.publish_raw(topics.task_start, b'{"id": "x", "file": "***"}')
    await probe.publish_raw(topics.task_stop, b"[]")
    result = await probe.run(wat.hello())
    assert result.state == COMPLETED
    assert {r.task_id for r in probe.results} == {result.task_id}


async def test_tasks_run_one_at_a_time_in_arrival_order(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    ids = [await probe.start(wat.printing(f"task {i}".encode())) for i in range(4)]
    await probe.result(ids[-1])
    seen = [(r.task_id, r.state) for r in probe.results]
    expected = [(t, s) for t in ids for s in (RUNNING, COMPLETED)]
    assert seen == expected


async def test_a_repeated_start_of_a_queued_task_runs_it_once(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    blocker = await probe.start(wat.infinite_loop())
    task = await probe.start(wat.hello(), task_id="dup-task")
    await probe.start(wat.hello(), task_id="dup-task")
    await probe.result(blocker)
    await probe.result(task)
    last = await probe.run(wat.printing(b"after"))
    assert last.results == "after"
    assert probe.states(task) == [RUNNING, COMPLETED]


async def start_attempt(probe: ManagerProbe, task_id: str, attempt: int, wasm: bytes) -> None:
    start = TaskStart(id=task_id, name="task", file=wasm, attempt=attempt)
    await probe.publish_raw(probe.topics.task_start, start.to_json())


def attempts(probe: ManagerProbe, task_id: str) -> list[tuple[int, str]]:
    return [(r.attempt, r.state) for r in probe.results if r.task_id == task_id]


async def test_every_result_carries_the_attempt_of_its_start(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    await start_attempt(probe, "numbered", 7, wat.hello())
    result = await probe.result("numbered")
    assert (result.state, result.results) == (COMPLETED, "hello from wasm\n")
    assert attempts(probe, "numbered") == [(7, RUNNING), (7, COMPLETED)]


async def test_a_new_attempt_of_the_running_task_runs_after_it(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    await start_attempt(probe, "again", 1, wat.infinite_loop())
    await probe.wait_until(lambda: (1, RUNNING) in attempts(probe, "again"))
    await start_attempt(probe, "again", 1, wat.infinite_loop())  # redelivered: ignored
    await start_attempt(probe, "again", 2, wat.printing(b"second run"))
    await start_attempt(probe, "again", 2, wat.printing(b"second run"))  # ignored
    await probe.wait_until(lambda: (2, COMPLETED) in attempts(probe, "again"))
    # Starts are handled in order: a task after them shows nothing else was run.
    assert (await probe.run(wat.printing(b"after"))).results == "after"
    assert attempts(probe, "again") == [(1, RUNNING), (1, FAILED), (2, RUNNING), (2, COMPLETED)]
    assert [r.results for r in probe.results if r.task_id == "again"][-1] == "second run"


async def test_a_new_attempt_of_a_queued_task_replaces_it(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    blocker = await probe.start(wat.infinite_loop())
    await probe.wait_until(lambda: RUNNING in probe.states(blocker))
    await start_attempt(probe, "requeued", 1, wat.printing(b"first run"))
    await start_attempt(probe, "requeued", 2, wat.printing(b"second run"))
    await start_attempt(probe, "requeued", 1, wat.printing(b"first run"))  # older: ignored
    await probe.wait_until(lambda: (2, COMPLETED) in attempts(probe, "requeued"))
    assert (await probe.run(wat.printing(b"after"))).results == "after"
    assert attempts(probe, "requeued") == [(1, INTERRUPTED), (2, RUNNING), (2, COMPLETED)]
    superseded, _, done = [r for r in probe.results if r.task_id == "requeued"]
    assert superseded.error == "interrupted: superseded by attempt 2"
    assert done.results == "second run"


async def test_stop_drops_a_queued_task_and_interrupts_the_running_one(
    proplet_config: PropletConfig, probe: ManagerProbe
) -> None:
    config = with_changes(proplet_config, task_timeout_s=30.0)
    async with Proplet(config) as p:
        running = await probe.start(wat.infinite_loop())
        queued = await probe.start(wat.hello())
        await probe.wait_until(lambda: RUNNING in probe.states(running))
        await probe.stop(queued)
        dropped = await probe.result(queued)
        assert dropped.state == INTERRUPTED
        assert "before it started" in dropped.error
        assert probe.states(queued) == [INTERRUPTED]

        await probe.stop(running)
        stopped = await probe.result(running)
        assert stopped.state == INTERRUPTED
        assert "stopped by request" in stopped.error

        after = await probe.run(wat.hello())
        assert after.state == COMPLETED
        assert p.running_task is None


async def test_stop_for_another_proplet_or_unknown_task_changes_nothing(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    await probe.stop("no-such-task")
    await probe.stop("whatever", proplet_id="someone-else")
    assert (await probe.run(wat.hello())).state == COMPLETED


async def test_heartbeats_arrive_at_the_configured_interval(
    proplet_config: PropletConfig, probe: ManagerProbe
) -> None:
    async with Proplet(proplet_config) as p:
        await probe.wait_until(lambda: len(probe.alive) >= 6, timeout=10)
        beats = [b for b in probe.alive if b.proplet_id == p.proplet_id]
        gaps = [b.timestamp - a.timestamp for a, b in itertools.pairwise(beats)]
        mean_gap = sum(gaps) / len(gaps)
        # Heartbeats are paced by the interval, not sent as fast as possible.
        assert mean_gap >= proplet_config.heartbeat_s * 0.5
        assert beats[-1].metadata["state"] == "idle"


async def test_stopped_proplet_goes_silent(
    proplet_config: PropletConfig, probe: ManagerProbe
) -> None:
    p = Proplet(with_changes(proplet_config, task_timeout_s=30.0))
    await p.__aenter__()
    await probe.wait_until(lambda: len(probe.alive) >= 2, timeout=10)
    running = await probe.start(wat.infinite_loop())
    queued = await probe.start(wat.hello())
    await probe.wait_until(lambda: RUNNING in probe.states(running))
    await p.stop()
    count = len(probe.alive)
    # Both tasks are accounted for, not left hanging in Running or in the queue.
    for task in (running, queued):
        result = await probe.result(task)
        assert (result.state, result.error) == (INTERRUPTED, "interrupted: proplet shutting down")
    # Nothing more arrives; wait several intervals to give a stray heartbeat its chance.
    with pytest.raises(TimeoutError):
        await probe.wait_until(lambda: len(probe.alive) > count, timeout=5 * 0.2)
    await p.stop()  # idempotent
    await p.__aexit__(None, None, None)


async def test_shutdown_interrupts_the_running_task(
    proplet_config: PropletConfig, probe: ManagerProbe
) -> None:
    config = with_changes(proplet_config, task_timeout_s=30.0)
    async with Proplet(config):
        task = await probe.start(wat.infinite_loop())
        await probe.wait_until(lambda: RUNNING in probe.states(task))
    result = await probe.result(task)
    assert result.state == INTERRUPTED
    assert "shutting down" in result.error


async def test_warm_start_does_not_recompile(
    proplet_config: PropletConfig, probe: ManagerProbe
) -> None:
    runtime = WasmRuntime()
    module = wat.printing(b"warm")
    async with Proplet(proplet_config, runtime=runtime):
        for _ in range(3):
            assert (await probe.run(module)).results == "warm"
    assert runtime.compiles == 1


async def test_many_proplets_in_one_process_share_compiled_modules(
    proplet_config: PropletConfig, probe: ManagerProbe
) -> None:
    runtime = WasmRuntime()
    configs = [
        with_changes(proplet_config, proplet_id=f"proplet-{i}-{uuid.uuid4().hex[:6]}")
        for i in range(5)
    ]
    proplets = [Proplet(c, runtime=runtime) for c in configs]
    for p in proplets:
        await p.__aenter__()
    try:
        module = wat.printing(b"shared")
        ids = [await probe.start(module, proplet_id=c.proplet_id) for c in configs]
        results = await asyncio.gather(*(probe.result(t) for t in ids))
        assert {r.results for r in results} == {"shared"}
        assert {r.proplet_id for r in results} == {c.proplet_id for c in configs}
    finally:
        for p in proplets:
            await p.stop()
    assert runtime.compiles == 1
