"""Tensors on the wire: raw little-endian bytes + dtype + shape, moved as chunk streams.

A model or update is an ordered mapping name -> numpy array. On the wire it is a header
listing each tensor's spec, then the C-ordered bytes of all tensors concatenated, cut into
chunks. sha256 is taken over exactly those concatenated bytes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from propeller.v1 import tensor_pb2
from server.errors import InvalidArgument

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


def tensor_bytes(tensors: Mapping[str, Array]) -> bytes:
    return b"".join(np.ascontiguousarray(a).tobytes() for a in tensors.values())


def sha256_of(tensors: Mapping[str, Array]) -> str:
    h = hashlib.sha256()
    for arr in tensors.values():
        if arr.size:  # memoryview cannot cast a view with a zero in its shape
            h.update(memoryview(np.ascontiguousarray(arr).data).cast("B"))
    return h.hexdigest()


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
    """Cut concatenated bytes back into named, writable arrays."""
    need = total_bytes(specs)
    if len(payload) != need:
        raise InvalidArgument(
            f"{field}: received {len(payload)} bytes of tensor data, header promises {need}"
        )
    out: Tensors = {}
    offset = 0
    view = memoryview(payload)
    for spec in specs:
        n = spec.nbytes
        arr = np.frombuffer(view[offset : offset + n], dtype=spec.dtype).reshape(spec.shape)
        # A bytearray payload already gives writable arrays; copy only immutable bytes.
        out[spec.name] = arr if arr.flags.writeable else arr.copy()
        offset += n
    return out


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
