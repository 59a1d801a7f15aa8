"""MQTT topics, all under one deployment namespace `m/{domain}/c/{channel}`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    domain: str = "propeller"
    channel: str = "fl"

    def __post_init__(self) -> None:
        for field in ("domain", "channel"):
            value = getattr(self, field)
            if not value or any(c in value for c in "/+#"):
                raise ValueError(f"mqtt {field}: {value!r} must be non-empty without / + #")

    @property
    def base(self) -> str:
        return f"m/{self.domain}/c/{self.channel}"

    @property
    def proplet_create(self) -> str:
        return f"{self.base}/control/proplet/create"

    @property
    def proplet_alive(self) -> str:
        return f"{self.base}/control/proplet/alive"

    @property
    def proplet_results(self) -> str:
        return f"{self.base}/control/proplet/results"

    @property
    def task_start(self) -> str:
        return f"{self.base}/control/manager/start"

    def task_start_for(self, proplet_id: str) -> str:
        """Where a task start addressed to one proplet goes: its own topic, so a fleet of N
        proplets costs N deliveries per round, not N x N. Broadcasts (empty id), and ids that
        cannot be a topic level, use the shared `task_start` topic every proplet reads."""
        if not proplet_id or any(c in proplet_id for c in "/+#"):
            return self.task_start
        return f"{self.task_start}/{proplet_id}"

    def is_task_start(self, topic: str) -> bool:
        return topic == self.task_start or topic.startswith(self.task_start + "/")

    @property
    def task_stop(self) -> str:
        return f"{self.base}/control/manager/stop"

    @property
    def round_next(self) -> str:
        return f"{self.base}/fl/rounds/next"
