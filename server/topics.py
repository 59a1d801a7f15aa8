"""MQTT topics, all under one deployment namespace `m/{domain}/c/{channel}`.

What a proplet says goes to a topic of its own: its id is the topic's last level
(`control/proplet/{create,alive,results}/{id}`), so the broker's ACL (`server.mqtt_acl`) lets
only that proplet publish there and the manager learns who spoke from the topic, whatever the
payload claims. What the manager says to one proplet goes to that proplet's own topics too
(`control/manager/{start,stop,ack}/{id}`); broadcasts use the shared `control/manager/start`
and `control/manager/stop`, the seed's single topics, which every proplet reads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from server.ids import id_problem

# The levels under the namespace: the one place their names are spelled (the ACL table uses
# them with a wildcard namespace).
PROPLET_CREATE = "control/proplet/create"
PROPLET_ALIVE = "control/proplet/alive"
PROPLET_RESULTS = "control/proplet/results"
TASK_START = "control/manager/start"
TASK_STOP = "control/manager/stop"
RESULT_ACK = "control/manager/ack"
ROUND_NEXT = "fl/rounds/next"


class Report(enum.Enum):
    """What a proplet publishes, by the topic it publishes it on."""

    CREATE = PROPLET_CREATE
    ALIVE = PROPLET_ALIVE
    RESULTS = PROPLET_RESULTS


def _level(proplet_id: str) -> str:
    """`proplet_id` as one topic level: an id (`server.ids`), so never a wildcard, an extra
    level or empty; ValueError otherwise."""
    problem = id_problem(proplet_id)
    if problem is not None:
        raise ValueError(f"proplet_id: {problem}")
    return proplet_id


@dataclass(frozen=True)
class Topics:
    domain: str = "propeller"
    channel: str = "fl"

    def __post_init__(self) -> None:
        for field in ("domain", "channel"):
            value = getattr(self, field)
            if not value or any(c in value for c in "/+#\x00"):
                raise ValueError(f"mqtt {field}: {value!r} must be non-empty without / + # NUL")

    @property
    def base(self) -> str:
        return f"m/{self.domain}/c/{self.channel}"

    # --- proplet -> manager: one topic per proplet and kind ----------------------------

    def report(self, kind: Report, proplet_id: str) -> str:
        return f"{self.base}/{kind.value}/{_level(proplet_id)}"

    def proplet_create_for(self, proplet_id: str) -> str:
        """Where `proplet_id` announces itself at start-up."""
        return self.report(Report.CREATE, proplet_id)

    def proplet_alive_for(self, proplet_id: str) -> str:
        """Where `proplet_id` heartbeats."""
        return self.report(Report.ALIVE, proplet_id)

    def proplet_results_for(self, proplet_id: str) -> str:
        """Where `proplet_id` reports its tasks' results."""
        return self.report(Report.RESULTS, proplet_id)

    @property
    def reports(self) -> list[str]:
        """The manager's subscriptions: every proplet's announcements, heartbeats and
        results."""
        return [f"{self.base}/{kind.value}/+" for kind in Report]

    def parse_report(self, topic: str) -> tuple[Report, str] | None:
        """(kind, proplet id) of a report topic of this namespace; None for any other topic
        (another namespace, another kind, no id, or an id that is not one)."""
        for kind in Report:
            prefix = f"{self.base}/{kind.value}/"
            if topic.startswith(prefix):
                proplet_id = topic[len(prefix) :]
                return (kind, proplet_id) if id_problem(proplet_id) is None else None
        return None

    # --- manager -> proplets ----------------------------------------------------------

    @property
    def task_start(self) -> str:
        """Broadcast task starts (any proplet may run them): the seed's single topic."""
        return f"{self.base}/{TASK_START}"

    def task_start_for(self, proplet_id: str) -> str:
        """Where a task start addressed to one proplet goes: its own topic, so a fleet of N
        proplets costs N deliveries per round, not N x N, and no proplet reads another's
        tasks. An empty id is a broadcast: the shared `task_start` topic."""
        if not proplet_id:
            return self.task_start
        return f"{self.task_start}/{_level(proplet_id)}"

    def is_task_start(self, topic: str) -> bool:
        return topic == self.task_start or topic.startswith(self.task_start + "/")

    @property
    def task_stop(self) -> str:
        """Broadcast task stops."""
        return f"{self.base}/{TASK_STOP}"

    def task_stop_for(self, proplet_id: str) -> str:
        """A stop addressed to one proplet (an empty id: the shared `task_stop`)."""
        if not proplet_id:
            return self.task_stop
        return f"{self.task_stop}/{_level(proplet_id)}"

    def is_task_stop(self, topic: str) -> bool:
        return topic == self.task_stop or topic.startswith(self.task_stop + "/")

    def result_ack_for(self, proplet_id: str) -> str:
        """Where the manager acknowledges `proplet_id`'s task results (`ResultAck`)."""
        return f"{self.base}/{RESULT_ACK}/{_level(proplet_id)}"

    def proplet_subscriptions(self, proplet_id: str) -> list[str]:
        """What a proplet subscribes to: its own task starts, stops and result
        acknowledgements, and the broadcast starts and stops."""
        return [
            self.task_start,
            self.task_start_for(proplet_id),
            self.task_stop,
            self.task_stop_for(proplet_id),
            self.result_ack_for(proplet_id),
        ]

    # --- coordinator -> anyone --------------------------------------------------------

    @property
    def round_next(self) -> str:
        return f"{self.base}/{ROUND_NEXT}"
