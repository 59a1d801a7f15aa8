"""Hypothesis strategies for hostile requests: strings (empty, huge, unicode, MQTT wildcards),
integers at the int32/int64 extremes, NaN/Inf floats, repeated fields with duplicates and
thousands of entries, tensor specs with out-of-enum dtypes and absurd shapes, chunk streams cut
and stitched wrongly, and raw bytes that are not protobuf at all.

Big values are built from a small draw (a character times a size), never drawn element by
element, so generation stays fast and under Hypothesis' per-example data budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import Message
from hypothesis import strategies as st

from propeller.v1 import aggregator_pb2, model_registry_pb2, tensor_pb2

T = TypeVar("T")
Strategy = st.SearchStrategy

NAN = math.nan
INF = math.inf

# MQTT wildcards and separators, control characters, path tricks, format strings, bidi and
# zero-width characters, near-misses of real references.
SPECIAL_TEXT = [
    "",
    " ",
    "/",
    "+",
    "#",
    "/+#",
    "a/b",
    "+/#",
    "$SYS/#",
    "m/+/c/#",
    "\x00",
    "\n",
    "\t",
    "a b",
    "..",
    "../../etc/passwd",
    "%s%n%x",
    "{0}{1}",
    "'; DROP TABLE rounds;--",
    "\u202e",
    "\ufeff",
    "\u200b",
    "😀",
    "ÿ",
    "null",
    "0",
    "-1",
    "fl/models/global_model_v",
    "fl/models/global_model_v-1",
    "fl/models/global_model_v0\n",
    "fl/models/global_model_v٣",
    "fl/models/global_model_v00",
    "fl/models/global_model_v1 ",
    " fl/models/global_model_v1",
    "FL/MODELS/GLOBAL_MODEL_V1",
    "fl/models/global_model_v9223372036854775807",
    "fl/models/global_model_v999999999999999999",
    "fl/models/global_model_v1/../v0",
]

INT64_EDGES = [
    0,
    1,
    -1,
    2,
    3,
    2**31 - 1,
    -(2**31),
    2**31,
    2**32,
    2**53 + 1,
    2**62,
    -(2**62),
    2**63 - 1,
    -(2**63),
    10**18 - 1,
    10**18,
]
INT32_EDGES = [0, 1, -1, 2, 3, 2**16, 2**31 - 1, -(2**31), -(2**31) + 1]
FLOAT_EDGES = [
    NAN,
    INF,
    -INF,
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-300,
    5e-324,
    -5e-324,
    1e308,
    -1e308,
    1.7976931348623157e308,
    2.0**53,
    3.4028235e38,
    3.5e38,
]
# Out-of-enum values are legal on the wire: proto3 enums are open.
BAD_ENUMS = [3, 4, -1, 99, 2**31 - 1, -(2**31)]


def weighted(*options: tuple[int, Strategy[T]]) -> Strategy[T]:
    """Pick one of `options` with the given relative weights (st.one_of is uniform)."""
    total = sum(w for w, _ in options)

    def pick(i: int) -> Strategy[T]:
        for w, s in options:
            if i < w:
                return s
            i -= w
        raise AssertionError("unreachable")

    return st.integers(0, total - 1).flatmap(pick)


def huge_text() -> Strategy[str]:
    """1 KiB .. 1 MiB of one (possibly multi-byte) character."""
    size = weighted(
        (4, st.just(1024)), (3, st.just(8193)), (2, st.just(65536)), (1, st.just(1 << 20))
    )
    return st.builds(lambda c, n: c * n, st.characters(), size)


def texts(known: Sequence[str] = ()) -> Strategy[str]:
    options: list[tuple[int, Strategy[str]]] = [
        (4, st.text(max_size=12)),
        (3, st.sampled_from(SPECIAL_TEXT)),
        (1, huge_text()),
    ]
    if known:
        options.append((4, st.sampled_from(list(known))))
    return weighted(*options)


MODEL_REF_NEAR_MISSES = [
    "fl/models/global_model_v",
    "fl/models/global_model_v-1",
    "fl/models/global_model_v+1",
    "fl/models/global_model_v0\n",
    "fl/models/global_model_v1\n",
    "fl/models/global_model_v٣",
    "fl/models/global_model_v\uff11",
    "fl/models/global_model_v00",
    "fl/models/global_model_v01",
    "fl/models/global_model_v1 ",
    " fl/models/global_model_v1",
    "fl/models/global_model_v1.0",
    "fl/models/global_model_v0x1",
    "fl/models/global_model_v1e3",
    "fl/models/global_model_v1_000",
    "FL/MODELS/GLOBAL_MODEL_V1",
    "/fl/models/global_model_v1",
    "fl/models//global_model_v1",
    "fl/models/global_model_v1/",
    "fl/models/global_model_v1/../v0",
    "fl/models/global_model_v9223372036854775807",
    "fl/models/global_model_v9223372036854775808",
    "fl/models/global_model_v1000000000000000000",
    "fl/models/global_model_v999999999999999999",
    "global_model_v1",
    "v1",
    "1",
    "fl/models/+",
    "fl/models/#",
]


def model_refs(known: Sequence[str]) -> Strategy[str]:
    """Model references: the known ones, near misses of the format, anything."""
    return weighted(
        (3, st.sampled_from(list(known))),
        (3, st.sampled_from(MODEL_REF_NEAR_MISSES)),
        (1, st.integers(0, 10**18 + 5).map(lambda v: f"fl/models/global_model_v{v}")),
        (2, texts()),
    )


def int64s() -> Strategy[int]:
    return weighted(
        (3, st.sampled_from(INT64_EDGES)),
        (2, st.integers(-3, 100)),
        (1, st.integers(-(2**63), 2**63 - 1)),
    )


def int32s() -> Strategy[int]:
    return weighted(
        (3, st.sampled_from(INT32_EDGES)),
        (2, st.integers(-3, 100)),
        (1, st.integers(-(2**31), 2**31 - 1)),
    )


def doubles() -> Strategy[float]:
    return weighted(
        (3, st.sampled_from(FLOAT_EDGES)),
        (2, st.floats(-1e6, 1e6)),
        (1, st.floats()),
    )


def enums(valid: Sequence[int]) -> Strategy[int]:
    return weighted(
        (4, st.sampled_from(list(valid))),
        (1, st.sampled_from(BAD_ENUMS)),
        (1, st.integers(-(2**31), 2**31 - 1)),
    )


def _many(n: int, dup: bool, known: Sequence[str]) -> list[str]:
    out = [f"fz-{i}" for i in range(n)]
    out[n // 2 : n // 2] = list(known)
    if dup:
        out.append(out[0])
    return out


def string_lists(known: Sequence[str] = ()) -> Strategy[list[str]]:
    """Repeated string fields: short, thousands of entries, with duplicates."""
    return weighted(
        (5, st.lists(texts(known), max_size=5)),
        (1, st.builds(_many, st.sampled_from([1000, 5000]), st.booleans(), st.just(known))),
        (1, st.lists(texts(known), min_size=1, max_size=3).map(lambda xs: [*xs, xs[0]])),
    )


def _big_map(n: int) -> dict[str, str]:
    return {f"K{i}": "v" * (i % 7) for i in range(n)}


def string_maps(known_keys: Sequence[str] = ()) -> Strategy[dict[str, str]]:
    return weighted(
        (5, st.dictionaries(texts(known_keys), texts(), max_size=4)),
        (1, st.builds(_big_map, st.sampled_from([1000, 3000]))),
    )


def double_maps() -> Strategy[dict[str, float]]:
    return weighted(
        (5, st.dictionaries(texts(("loss", "accuracy")), doubles(), max_size=4)),
        (1, st.builds(lambda n: {f"m{i}": float(i) for i in range(n)}, st.just(2000))),
    )


def binaries() -> Strategy[bytes]:
    return weighted(
        (5, st.binary(max_size=64)),
        (1, st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=2), st.just(1 << 19))),
    )


# ---- tensors -----------------------------------------------------------------------------

DTYPE_SIZES: dict[int, int] = {tensor_pb2.DTYPE_FLOAT32: 4, tensor_pb2.DTYPE_FLOAT64: 8}
_NUMPY: dict[int, np.dtype[Any]] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
}
# Data is only generated to match a spec when it is this small; bigger specs get junk bytes.
MAX_MATCHED_BYTES = 4096


def spec(name: str, dtype: int, shape: Sequence[int]) -> tensor_pb2.TensorSpec:
    """A TensorSpec; `dtype` may be any int32 (proto3 enums are open on the wire)."""
    msg = tensor_pb2.TensorSpec(name=name, shape=shape)
    msg.dtype = dtype  # type: ignore[assignment]
    return msg


def tensor(dtype: int, shape: Sequence[int], data: bytes) -> tensor_pb2.Tensor:
    msg = tensor_pb2.Tensor(shape=shape, data=data)
    msg.dtype = dtype  # type: ignore[assignment]
    return msg


def dtypes() -> Strategy[int]:
    return enums([tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT64, tensor_pb2.DTYPE_FLOAT64])


def dims() -> Strategy[int]:
    return weighted(
        (8, st.integers(0, 4)),
        (1, st.sampled_from([-1, -(2**63), 2**29, 2**31, 2**40, 2**62, 2**63 - 1, 10**9])),
    )


def shapes() -> Strategy[list[int]]:
    return weighted(
        (8, st.lists(dims(), max_size=3)),
        (1, st.lists(dims(), min_size=9, max_size=12)),
    )


def tensor_specs(names: Sequence[str] = ("w", "b")) -> Strategy[tensor_pb2.TensorSpec]:
    return st.builds(
        spec,
        texts(names),
        dtypes(),
        shapes(),
    )


def spec_lists(names: Sequence[str] = ("w", "b")) -> Strategy[list[tensor_pb2.TensorSpec]]:
    return weighted(
        (6, st.lists(tensor_specs(names), max_size=3)),
        (1, st.builds(_many_specs, st.sampled_from([500, 2000]))),
    )


def _many_specs(n: int) -> list[tensor_pb2.TensorSpec]:
    return [spec(f"t{i}", tensor_pb2.DTYPE_FLOAT32, [1]) for i in range(n)]


def matched_nbytes(specs: Sequence[tensor_pb2.TensorSpec]) -> int | None:
    """The byte count the specs describe, if they are well-formed and small enough to fill."""
    total = 0
    for s in specs:
        size = DTYPE_SIZES.get(s.dtype)
        if size is None or any(d < 0 for d in s.shape):
            return None
        total += math.prod(s.shape) * size
        if total > MAX_MATCHED_BYTES:
            return None
    return total


def encode_values(values: Sequence[float], dtype: int) -> bytes:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values, dtype=np.float64).astype(_NUMPY[dtype]).tobytes()


@st.composite
def tensor_bytes(
    draw: st.DrawFn, specs: Sequence[tensor_pb2.TensorSpec], finite: bool | None = None
) -> bytes:
    """Bytes for `specs`: matching in length (finite values, or NaN/Inf sprinkled in) when
    the specs allow it, otherwise junk."""
    need = matched_nbytes(specs)
    if need is None:
        return draw(st.binary(max_size=64))
    out = b""
    if finite is None:
        finite = draw(st.booleans())
    values = st.floats(-1e3, 1e3) if finite else doubles()
    for s in specs:
        n = math.prod(s.shape)
        fill = draw(st.sampled_from(["random", "zeros", "repeat"]))
        if fill == "random" or n <= 4:
            vals = draw(st.lists(values, min_size=n, max_size=n)) if n <= 64 else [0.0] * n
        elif fill == "zeros":
            vals = [0.0] * n
        else:
            vals = [draw(values)] * n
        out += encode_values(vals, s.dtype)
    return out


# ---- chunk streams -----------------------------------------------------------------------

# Mutations after which no reader may accept the stream (when the tensors need > 0 bytes).
BREAKING_MUTATIONS = [
    "no_header",
    "two_headers",
    "header_after_data",
    "data_before_header",
    "truncated",
    "extra_data",
    "header_only",
    "empty_chunk",
    "empty_stream",
]
STREAM_MUTATIONS = ["none", "none", "none", "rechunk", "zero_length_chunks", *BREAKING_MUTATIONS]

Chunk = tuple[str, Any]  # ("header", header message) | ("data", bytes) | ("empty", None)


@st.composite
def split_data(draw: st.DrawFn, data: bytes) -> list[bytes]:
    if not data:
        return []
    size = draw(weighted((3, st.just(len(data))), (2, st.integers(1, max(1, len(data))))))
    return [data[i : i + size] for i in range(0, len(data), size)]


@st.composite
def mutated_stream(
    draw: st.DrawFn, header: Any, data: bytes, mutation: str | None = None
) -> list[Chunk]:
    """A header + data chunk stream, possibly cut and stitched wrongly."""
    m = mutation if mutation is not None else draw(st.sampled_from(STREAM_MUTATIONS))
    parts: list[Chunk] = [("data", d) for d in draw(split_data(data))]
    h: Chunk = ("header", header)
    if m in ("none", "rechunk"):
        return [h, *parts]
    if m == "zero_length_chunks":
        return [h, ("data", b""), *parts, ("data", b"")]
    if m == "no_header":
        return parts or [("data", b"\x00")]
    if m == "two_headers":
        return [h, h, *parts]
    if m == "header_after_data":
        return [h, *parts, h]
    if m == "data_before_header":
        return [("data", data[:1] or b"\x00"), h, *parts]
    if m == "truncated":
        if not data:
            return [h, ("empty", None)]
        cut = draw(st.integers(0, len(data) - 1))
        return [h, *[("data", d) for d in draw(split_data(data[:cut]))]]
    if m == "extra_data":
        return [h, *parts, ("data", draw(st.binary(min_size=1, max_size=16)))]
    if m == "header_only":
        return [h] if data else [h, ("empty", None)]
    if m == "empty_chunk":
        at = draw(st.integers(0, len(parts) + 1))
        out = [h, *parts]
        out.insert(at, ("empty", None))
        return out
    if m == "empty_stream":
        return []
    raise AssertionError(m)


ChunkMessage = TypeVar(
    "ChunkMessage", tensor_pb2.ModelChunk, tensor_pb2.UpdateChunk, model_registry_pb2.LineageChunk
)


def chunk_messages(stream: Sequence[Chunk], kind: type[ChunkMessage]) -> list[ChunkMessage]:
    """The stream as `kind` messages (ModelChunk, UpdateChunk or LineageChunk): header, data
    or empty."""
    return [
        kind(header=value) if part == "header" else kind(data=value) if part == "data" else kind()
        for part, value in stream
    ]


def aggregate_chunk(kind: str, value: Any) -> aggregator_pb2.AggregateChunk:
    if kind == "aggregate_header":
        return aggregator_pb2.AggregateChunk(header=value)
    if kind == "header":
        return aggregator_pb2.AggregateChunk(update=value)
    if kind == "base":
        return aggregator_pb2.AggregateChunk(base=value)
    if kind == "state":
        return aggregator_pb2.AggregateChunk(state=value)
    if kind == "data":
        return aggregator_pb2.AggregateChunk(data=value)
    return aggregator_pb2.AggregateChunk()


# ---- raw wire bytes ----------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@st.composite
def wire_fields(draw: st.DrawFn) -> bytes:
    """Well-formed protobuf framing with arbitrary field numbers and wire types: known fields
    with the wrong type, unknown fields, varints of any size, invalid UTF-8 in strings."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        number = draw(weighted((3, st.integers(1, 12)), (1, st.integers(1, 2**29 - 1))))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(draw(st.integers(-(2**63), 2**64 - 1)))
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        else:
            payload = draw(st.binary(max_size=24))
            out += _varint(len(payload)) + payload
    return out


@st.composite
def corrupted(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid serialisation truncated, with a flipped byte, or with junk appended."""
    how = draw(st.sampled_from(["truncate", "flip", "append", "prefix"]))
    if how == "truncate" and valid:
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if how == "flip" and valid:
        at = draw(st.integers(0, len(valid) - 1))
        return valid[:at] + bytes([valid[at] ^ draw(st.integers(1, 255))]) + valid[at + 1 :]
    if how == "prefix":
        return draw(st.binary(min_size=1, max_size=4)) + valid
    return valid + draw(st.binary(min_size=1, max_size=8))


def _other_messages() -> list[bytes]:
    """Serialised messages of other types: the wrong message sent to an RPC."""
    from propeller.v1 import coordinator_pb2, datastore_pb2, manager_pb2, model_registry_pb2

    msgs: list[Message] = [
        manager_pb2.CreateTaskRequest(name="t", image_url="x", env={"A": "1"}, cli_args=["-v"]),
        manager_pb2.StartExperimentRequest(round_id="r", participants=["p"], k_of_n=1),
        coordinator_pb2.ConfigureRoundRequest(round_id="r", participants=["a", "b"], start=True),
        coordinator_pb2.RoundStatus(round_id="r", num_updates=3, metrics={"loss": 0.5}),
        model_registry_pb2.GetModelRequest(version=2**62, chunk_size=7),
        model_registry_pb2.InitModelRequest(dimension=-5, dtype=9),  # type: ignore[arg-type]
        datastore_pb2.PutDatasetRequest(dataset=datastore_pb2.Dataset(proplet_id="p")),
        tensor_pb2.ModelChunk(header=tensor_pb2.ModelHeader(version=1, total_bytes=8)),
        tensor_pb2.UpdateChunk(header=tensor_pb2.UpdateHeader(round_id="r", num_samples=-1)),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2], data=b"\x00" * 8),
        aggregator_pb2.AggregateChunk(header=aggregator_pb2.AggregateHeader(strategy=7)),  # type: ignore[arg-type]
    ]
    return [m.SerializeToString() for m in msgs]


OTHER_MESSAGES = _other_messages()


def raw_bodies(valid: Strategy[Message]) -> Strategy[bytes]:
    """Request bodies at the wire level: junk, mistyped fields, corrupted valid messages,
    messages of another type."""
    return weighted(
        (2, st.binary(max_size=48)),
        (2, wire_fields()),
        (3, valid.map(lambda m: m.SerializeToString()).flatmap(corrupted)),
        (1, st.sampled_from([b"\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x80" * 11])),
        (1, st.sampled_from(OTHER_MESSAGES)),
    )


def raw_streams(valid_items: Strategy[Sequence[Message]]) -> Strategy[list[bytes]]:
    """A request stream at the wire level: valid items with undecodable ones mixed in."""

    @st.composite
    def build(draw: st.DrawFn) -> list[bytes]:
        items = [m.SerializeToString() for m in draw(valid_items)]
        junk = draw(st.lists(raw_bodies(st.just(tensor_pb2.ModelChunk(data=b"x"))), max_size=3))
        for j in junk:
            items.insert(draw(st.integers(0, len(items))), j)
        return items

    return build()


def requests_or_raw(
    structured: Strategy[T], raw: Strategy[Any], raw_weight: int = 1, weight: int = 6
) -> Strategy[Any]:
    return weighted((weight, structured), (raw_weight, raw))
