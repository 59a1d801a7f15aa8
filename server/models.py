"""Model references: `fl/models/global_model_v{N}`."""

from __future__ import annotations

import re

from server.errors import InvalidArgument

MODEL_URI_PREFIX = "fl/models/global_model_v"
_MODEL_URI = re.compile(r"^fl/models/global_model_v(\d{1,18})$")


def model_uri(version: int) -> str:
    return f"{MODEL_URI_PREFIX}{version}"


def parse_model_uri(uri: str, field: str = "model_ref") -> int:
    """The version a model reference names; INVALID_ARGUMENT naming `field` otherwise."""
    m = _MODEL_URI.match(uri)
    if m is None:
        raise InvalidArgument(
            f"{field}: {uri!r} is not a model reference like '{MODEL_URI_PREFIX}0'"
        )
    return int(m.group(1))
