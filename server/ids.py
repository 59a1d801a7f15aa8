"""The one rule for ids, names and the sizes of what crosses gRPC or MQTT.

An **id** (proplet, round, experiment, task, dataset) is 1 to `MAX_ID_LENGTH` (64) characters
from `A-Z a-z 0-9 . _ -`, starting with a letter or a digit: `ID_PATTERN`. UUIDs, "demo-r1" and
"exp-r1" pass; nothing that could form an MQTT wildcard or an extra topic level (`+`, `#`,
`/`), no NUL, no whitespace, no ':' (so an operator's or a service's MQTT user name
`service:NAME` can never equal a proplet id). A **name** (a task's name such as
"fl-round-{round_id}-{proplet_id}", a metric, a tensor, a dataset's schema) has the same
charset and up to `MAX_NAME_LENGTH` (320) characters, room for two ids and a prefix.

Everything else a request or a message carries is bounded too: how many entries a list or map
may have (`MAX_PARTICIPANTS`, `MAX_ENTRIES`, `MAX_TENSORS`) and how many UTF-8 bytes a free
text may take (`MAX_VALUE_BYTES` for short values such as an image reference, an environment
value or a display name; `MAX_TEXT_BYTES` for a task's results and error). With every field
bounded, no single accepted request can make a service's state unboundedly large, and a page
of any list has a bounded size.

Pure: no I/O, nothing but `re` and the project's error type. `id_problem` / `name_problem` /
`valid_id` answer without raising (for MQTT parsing and the brokers' ACLs); the `check_*`
functions raise INVALID_ARGUMENT naming the field (for the gRPC edges).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sized

from server.errors import InvalidArgument, short_details

# 64: an id must fit where X.509 puts a proplet's identity for MQTT, the certificate's CN
# (at most 64 characters), so every valid proplet id can hold a certificate.
MAX_ID_LENGTH = 64
MAX_NAME_LENGTH = 320
# The rule as a regular expression (for mosquitto ACL generators, docs, other languages).
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,319}"

# Entries of one request or message: participants of a round, tensors of a model, and any
# other list or map (environment, arguments, metadata, metrics).
MAX_PARTICIPANTS = 10_000
MAX_TENSORS = 4096
MAX_ENTRIES = 256
# UTF-8 bytes of a short free-text value (an image reference, an environment value, an
# argument, a display name, metadata) and of a long one (a task's results or error).
MAX_VALUE_BYTES = 4096
MAX_TEXT_BYTES = 1 << 20
# A task's inline module (CreateTask's `file`), which every start of the task carries over
# MQTT (base64).
MAX_MODULE_BYTES = 16 << 20

_CHARSET = re.compile(r"[A-Za-z0-9._-]*\Z", re.ASCII)
_FIRST = re.compile(r"[A-Za-z0-9]", re.ASCII)
# How much of a refused value an error message shows.
_SHOWN = 40


def shown(value: str) -> str:
    """`value` for an error message: its repr, cut after a few dozen characters."""
    if len(value) <= _SHOWN:
        return repr(value)
    return f"{value[:_SHOWN]!r}... ({len(value)} characters)"


def _problem(value: str, max_length: int) -> str | None:
    if not value:
        return "must not be empty"
    if len(value) > max_length:
        return f"{shown(value)} is longer than {max_length} characters"
    if not _FIRST.match(value):
        return f"{shown(value)} must start with a letter or a digit"
    if not _CHARSET.match(value):
        bad = next(c for c in value if not _CHARSET.match(c))
        return f"{shown(value)} contains {bad!r}; use only A-Z a-z 0-9 . _ -"
    return None


def id_problem(value: str) -> str | None:
    """What is wrong with `value` as an id, or None when it is one."""
    return _problem(value, MAX_ID_LENGTH)


def name_problem(value: str) -> str | None:
    """What is wrong with `value` as a name, or None when it is one."""
    return _problem(value, MAX_NAME_LENGTH)


def valid_id(value: str) -> bool:
    return id_problem(value) is None


def valid_name(value: str) -> bool:
    return name_problem(value) is None


def _checked(value: str, field: str, optional: bool, problem: Callable[[str], str | None]) -> str:
    found = None if optional and not value else problem(value)
    if found is not None:
        raise InvalidArgument(f"{field}: {found}")
    return value


def check_id(value: str, field: str, *, optional: bool = False) -> str:
    """`value` if it is an id (or empty, when `optional`); INVALID_ARGUMENT naming `field`."""
    return _checked(value, field, optional, id_problem)


def check_name(value: str, field: str, *, optional: bool = False) -> str:
    """`value` if it is a name (or empty, when `optional`); INVALID_ARGUMENT naming `field`."""
    return _checked(value, field, optional, name_problem)


def check_count(values: Sized, field: str, limit: int = MAX_ENTRIES) -> None:
    if len(values) > limit:
        raise InvalidArgument(f"{field}: {len(values)} entries, at most {limit}")


def check_ids(values: Iterable[str], field: str, limit: int) -> None:
    """Each of `values` an id ("participants[3]: ..."), and at most `limit` of them."""
    items = list(values)
    check_count(items, field, limit)
    for i, value in enumerate(items):
        check_id(value, f"{field}[{i}]")


def text_problem(value: str, limit: int = MAX_VALUE_BYTES) -> str | None:
    """What is wrong with `value` as a free text of at most `limit` UTF-8 bytes (too long, not
    UTF-8 (a lone surrogate from JSON), or a NUL character, which no C string holds), or
    None."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > limit:
        return f"{size} bytes, at most {limit}"
    if "\x00" in value:
        return "contains a NUL character"
    return None


def check_text(value: str, field: str, limit: int = MAX_VALUE_BYTES) -> str:
    """`value` if it is a free text of at most `limit` bytes; INVALID_ARGUMENT naming `field`."""
    problem = text_problem(value, limit)
    if problem is not None:
        raise InvalidArgument(f"{field}: {problem}")
    return value


def check_texts(values: Iterable[str], field: str, limit: int = MAX_VALUE_BYTES) -> None:
    """A list of free texts: at most `MAX_ENTRIES` of them, each of at most `limit` bytes."""
    items = list(values)
    check_count(items, field)
    for i, value in enumerate(items):
        check_text(value, f"{field}[{i}]", limit)


def check_text_map(values: Mapping[str, str], field: str, limit: int = MAX_VALUE_BYTES) -> None:
    """A map of free texts (an environment, metadata): at most `MAX_ENTRIES` entries, keys
    non-empty and values of at most `limit` bytes, keys of at most `MAX_NAME_LENGTH`, no '='
    in a key (an environment could not hold it)."""
    check_count(values, field)
    for key, value in values.items():
        if not key:
            raise InvalidArgument(f"{field}: keys must not be empty")
        problem = text_problem(key, MAX_NAME_LENGTH)
        if problem is None and "=" in key:
            problem = "contains '='"
        if problem is not None:
            raise InvalidArgument(f"{field}: key {shown(key)}: {problem}")
        check_text(value, f"{field}[{key}]", limit)


def bounded_text(value: str, limit: int = MAX_TEXT_BYTES) -> str:
    """`value` cut to at most `limit` UTF-8 bytes (plus a note saying so): for free text that
    must be kept even when too long (a task's results and error reported over MQTT). What is
    not UTF-8 (a lone surrogate from JSON) becomes '?', so any store can hold it."""
    return short_details(value.encode("utf-8", "replace").decode("utf-8"), limit)
