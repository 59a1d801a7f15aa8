"""How every process writes its log: configured once, by the CLI (`configure_logging`).

The human format (`text`, the default) is one line of `time level logger message`. The
structured one (`PROPELLER_LOG_FORMAT=json`) is one JSON object per line and event, for a log
shipper: the message as written, and what the message says split out of it. Our log calls
carry their context in the message itself, as a `[Service.Method] key=value ...` prefix
(docs/engineering.md); this formatter is the one place that reads it back, so call sites stay
as they are and a `key=value` added to a message is a JSON field with no other change. A call
may also pass `extra={"round_id": ...}`: a record attribute wins over the message.

Every line has `round_id`, `experiment_id`, `proplet_id`, `trace_id` and `span_id`, empty when
the event has none (trace ids exist only when tracing is on: those of the span the event was
logged in, `server.tracing.current_ids`, unless the record carries its own, as OpenTelemetry's
logging instrumentation sets `otelTraceID` / `otelSpanID`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from server import tracing
from server.config import setting, settings_from_env

LOG_FORMAT_ENV = "PROPELLER_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# The ids every JSON line has, found in the message's key=value pairs or the record.
IDS = ("round_id", "experiment_id", "proplet_id")
TRACE_IDS = {"trace_id": "otelTraceID", "span_id": "otelSpanID"}

_PREFIX = re.compile(r"^\[([^\]\s]+)\]\s*")
# key=value where the value runs to the next space; a key starts a word of its own.
_PAIR = re.compile(r"(?<![\S])([a-z][a-z0-9_]*)=(\S*)")


@dataclass(frozen=True)
class LogConfig:
    """`format`: text (the default) or json."""

    format: str = setting(LOG_FORMAT_ENV, "text")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(
                f"{LOG_FORMAT_ENV}: {self.format!r} is not one of {', '.join(FORMATS)}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LogConfig:
        return cls(**settings_from_env(cls, env))


def event_fields(message: str) -> tuple[str, dict[str, str]]:
    """The `[Service.Method]` prefix of `message` ("" without one) and its key=value pairs."""
    prefix = _PREFIX.match(message)
    event = prefix[1] if prefix else ""
    return event, dict(_PAIR.findall(message))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, fields = event_fields(message)
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": event,
            "message": message,
        }
        for name in IDS:
            line[name] = str(getattr(record, name, "") or fields.pop(name, ""))
        # A handler formats in the thread that logged, inside the span it logged in.
        current = dict(zip(TRACE_IDS, tracing.current_ids(), strict=True))
        for name, otel in TRACE_IDS.items():
            value = getattr(record, name, "") or getattr(record, otel, "") or current[name]
            line[name] = "" if value in ("", "0", 0) else str(value)
        line["fields"] = fields
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: int, config: LogConfig) -> None:
    """The root logger at `level`, writing `config.format` lines to stderr. Like
    `logging.basicConfig`, it leaves a root logger that has handlers of someone else's alone
    (pytest's, when a test runs the CLI in its own process)."""
    root = logging.getLogger()
    if any(not isinstance(h, _OurHandler) for h in root.handlers):
        return
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = _OurHandler(sys.stderr)
    json_lines = config.format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)


class _OurHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` installs (and may replace)."""
