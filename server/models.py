"""Model references: `fl/models/global_model_v{N}`."""

from __future__ import annotations

import re

from server.errors import InvalidArgument

MODEL_URI_PREFIX = "fl/models/global_model_v"
# ASCII digits only (\d would take any Unicode digit), no leading zeros (one spelling per
# version), and nothing after them (`$` would allow a trailing newline).
_MODEL_URI = re.compile(r"fl/models/global_model_v(0|[1-9][0-9]{0,17})")
# The highest version a model reference can name (18 digits).
MAX_VERSION = 10**18 - 1


def model_uri(version: int) -> str:
    return f"{MODEL_URI_PREFIX}{version}"


def parse_model_uri(uri: str, field: str = "model_ref") -> int:
    """The version a model reference names; INVALID_ARGUMENT naming `field` otherwise."""
    m = _MODEL_URI.fullmatch(uri)
    if m is None:
        raise InvalidArgument(
            f"{field}: {uri!r} is not a model reference like '{MODEL_URI_PREFIX}0'"
        )
    return int(m.group(1))
