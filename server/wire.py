"""Domain values and their gRPC messages, field by field: a dataclass and the message that
carries it mostly share field names, and those fields are copied by name (`message_from`,
`value_from` the other way); what differs (an enum, a nested message, a renamed field, a
conversion) is written out at the call, and wins over the copy.

The one home of that idiom, so a field added to both a value and its message travels without
another line; what a service translates of its own stays in its servicer (the coordinator's
rounds: `server.coordinator.wire`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

M = TypeVar("M", bound=Message)
V = TypeVar("V", bound="DataclassInstance")


def message_from(message_type: type[M], value: DataclassInstance, **fields: Any) -> M:
    """A `message_type` holding `fields` and each other field of the dataclass `value` that
    the message has by the same name, as it is."""
    return message_type(**_with_shared(value, dataclasses.fields(value), message_type, fields))


def value_from(value_type: type[V], message: Message, **fields: Any) -> V:
    """A `value_type` (a dataclass) holding `fields` and each other field of `message` that
    the dataclass takes by the same name, as it is."""
    takes = [f for f in dataclasses.fields(value_type) if f.init]
    return value_type(**_with_shared(message, takes, message, fields))


def _with_shared(
    source: object,
    value_fields: Iterable[dataclasses.Field[Any]],
    message: Message | type[Message],
    fields: dict[str, Any],
) -> dict[str, Any]:
    """`fields`, and the value in `source` of each of `value_fields` that `message` (or its
    type) has too, unless `fields` gives it."""
    names = message.DESCRIPTOR.fields_by_name
    shared = {f.name: getattr(source, f.name) for f in value_fields if f.name in names}
    return {**shared, **fields}
