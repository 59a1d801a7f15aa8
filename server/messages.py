"""JSON payloads carried over MQTT between the manager, the coordinator and proplets.

Each is a frozen dataclass and a `Payload` (`to_json()` / `from_json()`); `from_json` raises
ValueError on a malformed payload so a subscriber can log and drop it without dying. Ids and
names follow the one rule (`server.ids`: a payload with a bad proplet or task id is
malformed), maps and lists are bounded, and a task's results and error are cut to
`MAX_TEXT_BYTES`.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, ClassVar, Self

from server.errors import InvalidArgument
from server.ids import (
    MAX_TEXT_BYTES,
    bounded_text,
    check_text_map,
    check_texts,
    id_problem,
    name_problem,
    text_problem,
)
from server.tracing import MAX_TRACEPARENT

# The largest MQTT packet the brokers take (mosquitto's `max_packet_size`, the embedded
# broker's reader): a TaskStart carrying the largest inline module (16 MiB, base64) with its
# bounded environment and arguments fits; a client announcing more is disconnected.
MAX_PACKET_BYTES = 32 << 20


def json_object(
    text: bytes | str,
    not_json: Callable[[ValueError], Exception],
    not_object: Callable[[str], Exception],
) -> dict[str, Any]:
    """`text` as one JSON object, for everything that reads one from outside (an MQTT payload,
    a module's stdout, an image manifest, strategy parameters). The reader words its own
    errors: `not_json` gets the parser's error (bytes that are not UTF-8 included),
    `not_object` the JSON type found instead (`list`, `str`, ...)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise not_json(exc) from None
    if not isinstance(value, dict):
        raise not_object(type(value).__name__)
    return value


def _load(payload: bytes | str) -> dict[str, Any]:
    return json_object(
        payload,
        lambda exc: ValueError(f"not JSON: {exc}"),
        lambda _: ValueError("payload is not a JSON object"),
    )


def _str(d: dict[str, Any], key: str, required: bool = False) -> str:
    v = d.get(key, "")
    if not isinstance(v, str):
        raise ValueError(f"{key}: expected a string")
    if required and not v:
        raise ValueError(f"{key}: required")
    return v


def _checked(key: str, problem: str | None) -> None:
    if problem is not None:
        raise ValueError(f"{key}: {problem}")


def _id(d: dict[str, Any], key: str, required: bool = False) -> str:
    """An id (`server.ids`; "" allowed unless `required`): a payload naming a proplet or task
    by anything else is malformed, so nothing unbounded or topic-forming is ever recorded."""
    v = _str(d, key, required)
    if v:
        _checked(key, id_problem(v))
    return v


def _name(d: dict[str, Any], key: str) -> str:
    v = _str(d, key)
    if v:
        _checked(key, name_problem(v))
    return v


def _text(d: dict[str, Any], key: str) -> str:
    """A short free text (`MAX_VALUE_BYTES`)."""
    v = _str(d, key)
    _checked(key, text_problem(v))
    return v


def _check_bounds(check: Callable[[Any, str], None], value: object, key: str) -> None:
    """`check` (the bound the gRPC side applies too) on `value`; what it refuses makes a
    payload malformed: a ValueError."""
    try:
        check(value, key)
    except InvalidArgument as exc:
        raise ValueError(str(exc)) from None


def _str_map(d: dict[str, Any], key: str) -> dict[str, str]:
    v = d.get(key) or {}
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    ):
        raise ValueError(f"{key}: expected an object of strings")
    _check_bounds(check_text_map, v, key)
    return dict(v)


def _str_list(d: dict[str, Any], key: str) -> list[str]:
    v = d.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{key}: expected a list of strings")
    _check_bounds(check_texts, v, key)
    return list(v)


def _attempt(d: dict[str, Any]) -> int:
    """The run of a task a start or result belongs to (absent in older peers' payloads: 0)."""
    v = d.get("attempt", 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("attempt: expected a non-negative integer")
    return v


def _traceparent(d: dict[str, Any]) -> str:
    """A trace context only ever adds spans: one that is not a short string is dropped, never
    a reason to refuse the task."""
    v = d.get("traceparent", "")
    return v if isinstance(v, str) and len(v) <= MAX_TRACEPARENT else ""


def _num(d: dict[str, Any], key: str, default: float = 0.0) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{key}: expected a number")
    return float(v)


class Payload:
    """What every payload shares: out as JSON of its fields, in through `from_json` (JSON, then
    the class's own `_from_dict`, which checks each field)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, payload: bytes | str) -> Self:
        return cls._from_dict(_load(payload))

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> Self:
        raise NotImplementedError(f"{cls.__name__} is only ever sent")


@dataclass(frozen=True)
class PropletAnnounce(Payload):
    """`control/proplet/create/{id}` (at start-up) and `control/proplet/alive/{id}`
    (heartbeats); `proplet_id` must be the topic's id (the manager drops it otherwise)."""

    proplet_id: str
    name: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> PropletAnnounce:
        return cls(
            proplet_id=_id(d, "proplet_id", required=True),
            name=_text(d, "name"),
            metadata=_str_map(d, "metadata"),
            timestamp=_num(d, "timestamp", time.time()),
        )


@dataclass(frozen=True)
class TaskSpec:
    """What a task runs and where: the module (an OCI `image_url` or the inline `file`), its
    environment and arguments, and the proplet (empty = any). The manager's task record
    (`server.manager.tasks.Task`) and the start message it publishes (`TaskStart`) both are
    one of these, so the two cannot drift apart."""

    id: str
    name: str
    image_url: str = ""
    file: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    cli_args: list[str] = field(default_factory=list)
    proplet_id: str = ""


@dataclass(frozen=True)
class TaskStart(TaskSpec, Payload):
    """`control/manager/start/{proplet_id}` (`control/manager/start` when `proplet_id` is
    empty: any proplet): run this module.

    `attempt` numbers the manager's starts of this task (1, 2, ... after each restart); the
    proplet echoes it in every `TaskResult` of this run so a late result of an earlier run is
    not taken for the current one."""

    attempt: int = 0
    # The W3C trace context of the manager's `task start` span (server.tracing: why in the
    # JSON and not in an MQTT 5 property); empty when tracing is off.
    traceparent: str = ""

    @classmethod
    def of(cls, spec: TaskSpec, attempt: int) -> TaskStart:
        """The start of attempt `attempt` of the task `spec` describes."""
        return cls(**{f.name: getattr(spec, f.name) for f in fields(TaskSpec)}, attempt=attempt)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["file"] = base64.b64encode(self.file).decode()
        return json.dumps(d).encode()

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> TaskStart:
        try:
            file = base64.b64decode(_str(d, "file"), validate=True)
        except ValueError:
            raise ValueError("file: not base64") from None
        return cls(
            id=_id(d, "id", required=True),
            name=_name(d, "name"),
            image_url=_text(d, "image_url"),
            file=file,
            env=_str_map(d, "env"),
            cli_args=_str_list(d, "cli_args"),
            proplet_id=_id(d, "proplet_id"),
            attempt=_attempt(d),
            traceparent=_traceparent(d),
        )


@dataclass(frozen=True)
class TaskStop(Payload):
    """`control/manager/stop/{proplet_id}` (`control/manager/stop`: any proplet)."""

    id: str
    proplet_id: str = ""

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> TaskStop:
        return cls(id=_id(d, "id", required=True), proplet_id=_id(d, "proplet_id"))


# Task states as they travel in results (the proto TaskState names without prefix).
RUNNING = "Running"
COMPLETED = "Completed"
FAILED = "Failed"
INTERRUPTED = "Interrupted"
RESULT_STATES = (RUNNING, COMPLETED, FAILED, INTERRUPTED)


@dataclass(frozen=True)
class TaskResult(Payload):
    """`control/proplet/results/{proplet_id}`: a task changed state on a proplet; `attempt` is
    that of the `TaskStart` the proplet was running. The proplet sends it again until a
    `ResultAck` says the manager has it."""

    task_id: str
    proplet_id: str
    state: str
    results: str = ""
    error: str = ""
    timestamp: float = field(default_factory=time.time)
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.state not in RESULT_STATES:
            raise ValueError(f"state: {self.state!r} not one of {RESULT_STATES}")
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 0:
            raise ValueError(f"attempt: {self.attempt!r} is not a non-negative integer")

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> TaskResult:
        return cls(
            task_id=_id(d, "task_id", required=True),
            proplet_id=_id(d, "proplet_id"),
            state=_str(d, "state", required=True),
            results=bounded_text(_str(d, "results"), MAX_TEXT_BYTES),
            error=bounded_text(_str(d, "error"), MAX_TEXT_BYTES),
            timestamp=_num(d, "timestamp", time.time()),
            attempt=_attempt(d),
        )


@dataclass(frozen=True)
class ResultAck(Payload):
    """`control/manager/ack/{proplet_id}`: the manager has handled the result `state` of
    attempt `attempt` of task `task_id` (recorded it on disk, or knowingly ignored it: a stale
    attempt, an unknown task, a repeat), so the proplet stops sending it again."""

    task_id: str
    attempt: int
    state: str

    def __post_init__(self) -> None:
        if self.state not in RESULT_STATES:
            raise ValueError(f"state: {self.state!r} not one of {RESULT_STATES}")

    @classmethod
    def of(cls, result: TaskResult) -> ResultAck:
        return cls(result.task_id, result.attempt, result.state)

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> ResultAck:
        return cls(
            task_id=_id(d, "task_id", required=True),
            attempt=_attempt(d),
            state=_str(d, "state", required=True),
        )


@dataclass(frozen=True)
class RoundComplete(Payload):
    """`fl/rounds/next`: the round closed and produced a new model version."""

    round_id: str
    new_model_version: int
    model_uri: str
    num_updates: int
    closed_by: str
    status: str = "complete"
    next_round_available: bool = True
    timestamp: float = field(default_factory=time.time)
