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

    @property
    def task_stop(self) -> str:
        return f"{self.base}/control/manager/stop"

    @property
    def round_start(self) -> str:
        return f"{self.base}/fl/rounds/start"

    @property
    def round_next(self) -> str:
        return f"{self.base}/fl/rounds/next"
