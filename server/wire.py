"""Domain values and their gRPC messages, field by field: a dataclass and the message that
carries it mostly share field names, and those fields are copied by name (`message_from`);
what differs (an enum, a nested message, a renamed field, a conversion) is
written out at the call, and wins over the copy.

The one home of that idiom, so a field added to both a value and its message travels without
another line; what a service translates of its own stays in its servicer (the coordinator's
rounds: `server.coordinator.wire`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

M = TypeVar("M", bound=Message)


def message_from(message_type: type[M], value: DataclassInstance, **fields: Any) -> M:
    """A `message_type` holding `fields` and every other field of the dataclass `value` that
    the message has by the same name, as it is."""
    names = message_type.DESCRIPTOR.fields_by_name
    shared = {
        f.name: getattr(value, f.name)
        for f in dataclasses.fields(value)
        if f.name in names and f.name not in fields
    }
    return message_type(**shared, **fields)
