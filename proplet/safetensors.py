"""The safetensors container, as trainer contract v2 uses it (wasm-client/README.md).

A container is: a u64 little-endian header length, a JSON header (an object mapping each
tensor's name to {"dtype", "shape", "data_offsets": [begin, end]} relative to the data
section, plus an optional "__metadata__" object of string to string), then the data section:
raw little-endian bytes, each tensor's bytes exactly at its offsets, with no holes and no
overlap. `decode` checks all of that and raises `MalformedContainer` naming what is wrong;
it never trusts a length before checking it against the bytes present.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.tensors import Array

# safetensors dtype names for the dtypes our tensors may have (server/tensors.py).
DTYPE_NAMES: dict[np.dtype[Any], str] = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64"}
DTYPES: dict[str, np.dtype[Any]] = {name: dtype for dtype, name in DTYPE_NAMES.items()}
METADATA = "__metadata__"
_LENGTH = struct.Struct("<Q")


class MalformedContainer(ValueError):
    """Bytes that are not a well-formed safetensors container; the message says why."""


@dataclass(frozen=True)
class Container:
    """A decoded container: its tensors (in header order), its metadata, and how many bytes
    of the input it took."""

    tensors: dict[str, Array]
    metadata: dict[str, str]
    size: int


def encode(tensors: Mapping[str, Array], metadata: Mapping[str, str] | None = None) -> bytes:
    """`tensors` (F32 or F64 arrays) as one container, the header padded with spaces to a
    multiple of 8 bytes so that the data section starts aligned."""
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA] = dict(metadata)
    # Each tensor's bytes as a view where it already is little-endian and contiguous: the
    # join below is then the only copy.
    parts: list[memoryview] = []
    offset = 0
    for name, arr in tensors.items():
        dtype = np.dtype(arr.dtype).newbyteorder("<")
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {arr.dtype} has no safetensors name here")
        raw = np.ascontiguousarray(arr, dtype=dtype).reshape(-1).view(np.uint8)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": [int(d) for d in arr.shape],
            "data_offsets": [offset, offset + raw.nbytes],
        }
        parts.append(raw.data)
        offset += raw.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([_LENGTH.pack(len(text)), text, *parts])


def _fail(what: str, message: str) -> MalformedContainer:
    return MalformedContainer(f"{what}: {message}")


def _dimension(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def decode(data: bytes | memoryview, what: str, *, max_header_bytes: int = 1 << 20) -> Container:
    """The container at the start of `data` (more bytes may follow it). `what` names it in
    errors ("update", "model", ...)."""
    view = memoryview(data)
    if len(view) < _LENGTH.size:
        raise _fail(what, f"{len(view)} bytes, too short for the 8-byte header length")
    (header_len,) = _LENGTH.unpack_from(view)
    if header_len > min(len(view) - _LENGTH.size, max_header_bytes):
        raise _fail(
            what,
            f"header length {header_len} exceeds the {len(view) - _LENGTH.size} bytes after it"
            + (f" or the {max_header_bytes}-byte limit" if header_len > max_header_bytes else ""),
        )
    start = _LENGTH.size + header_len
    try:
        header = json.loads(bytes(view[_LENGTH.size : start]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(what, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(what, f"header is JSON {type(header).__name__}, not an object")
    metadata = header.pop(METADATA, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(what, f"{METADATA} is not an object of strings")
    body = view[start:]
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, Array] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _fail(what, f"tensor {name!r}: entry is not an object")
        dtype = DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise _fail(
                what, f"tensor {name!r}: dtype {info.get('dtype')!r} is not one of F32, F64"
            )
        shape = info.get("shape")
        dims = [_dimension(d) for d in shape] if isinstance(shape, list) else [None]
        if any(d is None for d in dims):
            raise _fail(what, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        offsets = info.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or any(_dimension(o) is None for o in offsets)
        ):
            raise _fail(what, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        nbytes = math.prod(d for d in dims if d is not None) * dtype.itemsize
        if end - begin != nbytes:
            raise _fail(
                what,
                f"tensor {name!r}: data_offsets [{begin}, {end}] hold {end - begin} bytes, "
                f"its dtype and shape need {nbytes}",
            )
        if end > len(body):
            raise _fail(
                what, f"tensor {name!r}: data ends at {end}, past the {len(body)} data bytes"
            )
        spans.append((begin, end, name))
        flat = np.frombuffer(body, dtype=dtype, count=nbytes // dtype.itemsize, offset=begin)
        tensors[name] = flat.reshape([d for d in dims if d is not None])
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            kind = "overlaps the tensor before it" if begin < covered else "leaves a hole before it"
            raise _fail(what, f"tensor {name!r}: data at [{begin}, {end}] {kind}")
        covered = end
    return Container(tensors, dict(metadata), start + covered)
