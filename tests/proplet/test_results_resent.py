"""A proplet's task results are sent again until the manager acknowledges them (issue 10,
item 1): what a broker that died lost is sent again, and nothing is run twice."""

from __future__ import annotations

from proplet import Proplet, PropletConfig
from server.messages import COMPLETED, RUNNING, TaskStart
from tests.proplet import wat
from tests.proplet.conftest import ManagerProbe, with_changes
from tests.support.waits import eventually

RESEND_S = 0.2


async def test_an_unacknowledged_result_is_sent_again_until_acknowledged(
    proplet_config: PropletConfig, probe: ManagerProbe
) -> None:
    probe.acking = False  # the manager hears nothing (its acknowledgements are lost)
    config = with_changes(proplet_config, result_resend_s=RESEND_S)
    async with Proplet(config) as proplet:
        task_id = await probe.start(wat.hello(), proplet_id=config.proplet_id)
        await probe.wait_until(lambda: probe.states(task_id).count(COMPLETED) >= 3)
        # Sent again in the order produced, every attempt number the same.
        assert probe.states(task_id)[:2] == [RUNNING, COMPLETED]
        assert {r.attempt for r in probe.results if r.task_id == task_id} == {0}
        assert [r.state for r in proplet.unacknowledged] == [RUNNING, COMPLETED]
        probe.acking = True  # acknowledged from now on: the proplet stops
        await eventually(lambda: _unacknowledged(proplet), lambda u: u == [])
        sent = len(probe.results)
        # Nothing more is sent: the next task's results are the next thing published.
        second = await probe.run(wat.printing(b"next"), proplet_id=config.proplet_id)
        assert second.results == "next"
        assert [r.task_id for r in probe.results[sent:]] == [second.task_id] * 2


async def test_a_start_sent_again_for_an_attempt_that_ran_is_not_run_again(
    proplet: Proplet, probe: ManagerProbe
) -> None:
    """The manager sends a start again when it has heard nothing (its copy of the result
    was lost with a broker): the proplet does not run that attempt twice."""
    start = TaskStart(id="once", name="t", file=wat.hello(), attempt=1)
    await probe.publish_raw(probe.topics.task_start_for(proplet.proplet_id), start.to_json())
    await probe.result("once")
    await probe.publish_raw(probe.topics.task_start_for(proplet.proplet_id), start.to_json())
    # A task after it: once its result is in, the repeated start was handled before it.
    await probe.run(wat.printing(b"after"), proplet_id=proplet.proplet_id)
    assert probe.states("once") == [RUNNING, COMPLETED]
    # A new attempt of it does run.
    again = TaskStart(id="once", name="t", file=wat.printing(b"second"), attempt=2)
    await probe.publish_raw(probe.topics.task_start_for(proplet.proplet_id), again.to_json())
    await probe.wait_until(lambda: probe.states("once") == [RUNNING, COMPLETED] * 2)
    assert [r.results for r in probe.results if r.task_id == "once"][-1] == "second"


async def _unacknowledged(proplet: Proplet) -> list[str]:
    return [r.state for r in proplet.unacknowledged]
