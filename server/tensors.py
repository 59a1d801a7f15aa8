"""Tensors on the wire and at rest: raw little-endian bytes + dtype + shape.

A model or update is an ordered mapping name -> numpy array. On the wire it is a header
listing each tensor's spec, then the C-ordered bytes of all tensors concatenated, cut into
chunks. sha256 is taken over exactly those concatenated bytes. The stores keep the same bytes
(one BLOB) next to the specs as JSON and the sha256, and check both before serving them.

This module is the one codec: specs <-> proto and JSON, tensors <-> bytes (`tensor_bytes`,
`tensors_from_bytes`, `split_payload` for the wire, `verified_tensors` for storage), and the
one rule for where array work runs (`offload_if_big`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ParamSpec, Protocol, TypeVar

import blake3
import numpy as np
import numpy.typing as npt

from propeller.v1 import tensor_pb2
from server.errors import DataLoss, InvalidArgument

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_CHUNK_SIZE = 1 << 20
# No 4 MB ceiling: chunk streams carry big payloads, and unary messages may be large too.
MAX_MESSAGE_BYTES = 64 << 20
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# Bound on the bytes a tensor's non-zero dimensions describe, so every shape that passes is one
# numpy can create (its index type is int64), also as float64 sums.
MAX_SHAPE_BYTES = 1 << 40

Array = npt.NDArray[np.floating]
Tensors = dict[str, Array]

_DTYPES: dict[tensor_pb2.DType, np.dtype[np.floating]] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
}
# Dtypes in stored JSON specs: written as numpy's name ("float32"); the byte-order spelling
# ("<f4") is what the coordinator's state file held before, and is still read.
_DTYPE_NAMES: dict[str, np.dtype[np.floating]] = {
    **{d.name: d for d in _DTYPES.values()},
    **{d.str: d for d in _DTYPES.values()},
}

# Array work (hashing, checks, copies, folding, serializing) on at most this many bytes runs on
# the event loop: handing it to a thread and back costs more than the work (two GIL hand-offs,
# each up to the 5 ms switch interval when the loop is busy). Bigger work goes to a thread, so
# the loop keeps serving every other call meanwhile.
INLINE_BYTES = 256 << 10


async def offload_if_big(
    nbytes: int, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    """`fn(*args, **kwargs)` on the event loop when it works on at most `INLINE_BYTES`
    (`nbytes`), else in a worker thread (`asyncio.to_thread`)."""
    if nbytes <= INLINE_BYTES:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def dtype_from_proto(value: int, field: str) -> np.dtype[np.floating]:
    try:
        return _DTYPES[value]  # type: ignore[index]  # any int may arrive off the wire
    except KeyError:
        raise InvalidArgument(
            f"{field}: unsupported dtype {value} (want DTYPE_FLOAT32 or DTYPE_FLOAT64)"
        ) from None


def dtype_to_proto(dtype: np.dtype[np.floating]) -> tensor_pb2.DType:
    for key, value in _DTYPES.items():
        if value == dtype:
            return key
    raise InvalidArgument(f"dtype: unsupported numpy dtype {dtype}")


@dataclass(frozen=True)
class Spec:
    """Name, dtype and shape of one tensor."""

    name: str
    dtype: np.dtype[np.floating]
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def to_proto(self) -> tensor_pb2.TensorSpec:
        return tensor_pb2.TensorSpec(
            name=self.name, dtype=dtype_to_proto(self.dtype), shape=list(self.shape)
        )


def spec_from_proto(msg: tensor_pb2.TensorSpec, field: str) -> Spec:
    if not msg.name:
        raise InvalidArgument(f"{field}.name: must not be empty")
    dtype = dtype_from_proto(msg.dtype, f"{field}.dtype")
    if any(d < 0 for d in msg.shape):
        raise InvalidArgument(f"{field}.shape: negative dimension in {list(msg.shape)}")
    if len(msg.shape) > 8:
        raise InvalidArgument(f"{field}.shape: more than 8 dimensions")
    # numpy refuses such shapes even when a zero dimension leaves the tensor empty.
    if math.prod(d for d in msg.shape if d) * dtype.itemsize > MAX_SHAPE_BYTES:
        raise InvalidArgument(
            f"{field}.shape: {list(msg.shape)} describes more than {MAX_SHAPE_BYTES} bytes"
        )
    return Spec(msg.name, dtype, tuple(int(d) for d in msg.shape))


def specs_from_proto(msgs: Sequence[tensor_pb2.TensorSpec], field: str) -> list[Spec]:
    specs = [spec_from_proto(m, f"{field}[{i}]") for i, m in enumerate(msgs)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{field}: duplicate tensor names in {names}")
    return specs


def specs_of(tensors: Mapping[str, Array]) -> list[Spec]:
    return [Spec(name, arr.dtype, tuple(arr.shape)) for name, arr in tensors.items()]


def total_bytes(specs: Sequence[Spec]) -> int:
    return sum(s.nbytes for s in specs)


def nbytes_of(tensors: Mapping[str, Array]) -> int:
    return sum(int(a.nbytes) for a in tensors.values())


def tensor_bytes(tensors: Mapping[str, Array]) -> bytearray:
    """The tensors' bytes concatenated: C order, little-endian, in mapping order, written into
    one buffer (no per-tensor copies joined afterwards)."""
    arrays = [
        # asarray, not ascontiguousarray: that one turns a 0-d array into shape (1,).
        np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")
        for a in tensors.values()
    ]
    out = bytearray(sum(a.nbytes for a in arrays))
    offset = 0
    for arr in arrays:
        n = arr.nbytes
        if n:
            target = np.frombuffer(out, dtype=np.uint8, count=n, offset=offset)
            target[:] = arr.reshape(-1).view(np.uint8)
        offset += n
    return out


def tensors_from_bytes(payload: bytes | bytearray | memoryview, specs: Sequence[Spec]) -> Tensors:
    """Arrays over `payload` (concatenated as `tensor_bytes` writes them) without a copy:
    writable over a bytearray, read-only over bytes. The caller has checked the length."""
    out: Tensors = {}
    offset = 0
    for spec in specs:
        count = spec.nbytes // spec.dtype.itemsize
        arr = np.frombuffer(payload, dtype=spec.dtype, count=count, offset=offset)
        out[spec.name] = arr.reshape(spec.shape)
        offset += spec.nbytes
    return out


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


# The digests of a model's bytes (its tensors' bytes concatenated): sha256 names a version
# everywhere (content address, provenance, lineage); BLAKE3 (256 bits, also cryptographic)
# is what a downloader checks when the registry states it, at 5x sha256's speed here and
# more on CPUs without SHA instructions (docs/architecture.md, "Model downloads").
DIGESTS: dict[str, Callable[[], Hasher]] = {
    "sha256": hashlib.sha256,
    "blake3": lambda: blake3.blake3(max_threads=1),
}


def digest_of_tensors(tensors: Mapping[str, Array], algorithm: str) -> str:
    h = DIGESTS[algorithm]()
    for arr in tensors.values():
        if arr.size:  # memoryview cannot cast a view with a zero in its shape
            h.update(memoryview(np.ascontiguousarray(arr).data).cast("B"))
    return h.hexdigest()


def sha256_of(tensors: Mapping[str, Array]) -> str:
    return digest_of_tensors(tensors, "sha256")


def blake3_of(tensors: Mapping[str, Array]) -> str:
    return digest_of_tensors(tensors, "blake3")


async def digest_of(tensors: Mapping[str, Array]) -> str:
    """`sha256_of(tensors)` from async code: in a worker thread when they are big."""
    return await offload_if_big(nbytes_of(tensors), sha256_of, tensors)


def iter_chunks(tensors: Mapping[str, Array], chunk_size: int) -> Iterator[bytes]:
    """The concatenated tensor bytes cut into chunks of at most chunk_size."""
    if chunk_size <= 0:
        chunk_size = DEFAULT_CHUNK_SIZE
    for arr in tensors.values():
        if not arr.size:  # no bytes; and memoryview cannot cast a view with a zero in its shape
            continue
        view = memoryview(np.ascontiguousarray(arr).data).cast("B")
        for start in range(0, len(view), chunk_size):
            yield bytes(view[start : start + chunk_size])


def split_payload(
    payload: bytes | bytearray | memoryview, specs: Sequence[Spec], field: str
) -> Tensors:
    """Cut received bytes back into named, writable arrays (INVALID_ARGUMENT on a length the
    specs do not promise)."""
    need = total_bytes(specs)
    if len(payload) != need:
        raise InvalidArgument(
            f"{field}: received {len(payload)} bytes of tensor data, header promises {need}"
        )
    # A bytearray payload already gives writable arrays; copy only immutable bytes.
    return {
        name: arr if arr.flags.writeable else arr.copy()
        for name, arr in tensors_from_bytes(payload, specs).items()
    }


def verified_tensors(
    payload: bytes | memoryview,
    specs: Sequence[Spec],
    sha256: str,
    what: str,
    corrupted: type[DataLoss] = DataLoss,
) -> Tensors:
    """Read-only arrays over stored bytes (no copy; a memoryview must be read-only), once
    their length matches the specs and their sha256 the recorded one; `corrupted` (a
    DATA_LOSS error) naming `what` otherwise.
    Stored data is never served unchecked. Hashing is the expensive part: callers run this
    through `offload_if_big`."""
    need = total_bytes(specs)
    if len(payload) != need:
        raise corrupted(
            f"{what} is corrupted in storage: {len(payload)} tensor bytes stored, its record "
            f"promises {need}"
        )
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise corrupted(
            f"{what} is corrupted in storage: the stored bytes fail their integrity check "
            f"(sha256 {digest}, recorded {sha256})"
        )
    return tensors_from_bytes(payload, specs)


def specs_to_json(specs: Sequence[Spec]) -> str:
    """Specs as stored next to tensor bytes: `[{"name", "dtype", "shape"}, ...]`."""
    return json.dumps(
        [{"name": s.name, "dtype": s.dtype.name, "shape": list(s.shape)} for s in specs],
        separators=(",", ":"),
    )


def specs_from_json(text: str) -> tuple[Spec, ...]:
    """The specs `specs_to_json` wrote; ValueError for anything else."""
    try:
        return tuple(
            Spec(str(t["name"]), _DTYPE_NAMES[t["dtype"]], tuple(_dimension(d) for d in t["shape"]))
            for t in json.loads(text)
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a list of tensor specs: {exc!r}") from None


def _dimension(value: object) -> int:
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"bad dimension {value!r}")
    return value


def check_finite(tensors: Mapping[str, Array], field: str) -> None:
    for name, arr in tensors.items():
        if not np.isfinite(arr).all():
            raise InvalidArgument(f"{field}.{name}: contains NaN or Inf")


def tensor_to_proto(arr: Array) -> tensor_pb2.Tensor:
    arr = np.ascontiguousarray(arr)
    return tensor_pb2.Tensor(
        dtype=dtype_to_proto(arr.dtype), shape=list(arr.shape), data=arr.tobytes()
    )


def tensor_from_proto(msg: tensor_pb2.Tensor, field: str) -> Array:
    spec = spec_from_proto(
        tensor_pb2.TensorSpec(name=field, dtype=msg.dtype, shape=msg.shape), field
    )
    return split_payload(msg.data, [spec], field)[spec.name]


def to_json_value(arr: Array) -> object:
    """A tensor as the seed's JSON model value: a scalar, a list, or nested lists."""
    return arr.tolist()


def model_to_json(tensors: Mapping[str, Array]) -> dict[str, object]:
    return {name: to_json_value(arr) for name, arr in tensors.items()}


def model_from_json(value: object, specs: Sequence[Spec], field: str) -> Tensors:
    """Parse a JSON model ({"w": [...], "b": x}) into arrays matching the expected specs."""
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"{field}: expected a JSON object of tensors, got {type(value).__name__}"
        )
    out: Tensors = {}
    for spec in specs:
        if spec.name not in value:
            raise InvalidArgument(f"{field}.{spec.name}: missing")
        try:
            arr = np.asarray(value[spec.name], dtype=spec.dtype)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{field}.{spec.name}: not numeric") from None
        if arr.shape != spec.shape:
            raise InvalidArgument(
                f"{field}.{spec.name}: shape {list(arr.shape)}, base model has {list(spec.shape)}"
            )
        out[spec.name] = arr
    extra = sorted(set(value) - {s.name for s in specs})
    if extra:
        raise InvalidArgument(f"{field}: unexpected tensors {extra}")
    return out
