"""Chunk streams for models and updates: build them from arrays, read them back with checks.

Readers enforce that the header comes first and exactly once, that no more bytes arrive than
the header promises, and that the stream is not truncated.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from propeller.v1 import tensor_pb2
from server.errors import InvalidArgument, PropellerError
from server.ids import MAX_TENSORS, check_count, check_name
from server.tensors import (
    Array,
    Spec,
    Tensors,
    iter_chunks,
    sha256_of,
    specs_from_proto,
    specs_of,
    split_payload,
    total_bytes,
)

H = TypeVar("H", tensor_pb2.ModelHeader, tensor_pb2.UpdateHeader)

# Upper bound for one model or update assembled in memory (a guard against absurd headers).
MAX_PAYLOAD_BYTES = 4 << 30


def model_stream(
    tensors: Mapping[str, Array],
    chunk_size: int,
    *,
    version: int | None = None,
    model_uri: str = "",
    sha256: str | None = None,
) -> Iterator[tensor_pb2.ModelChunk]:
    specs = specs_of(tensors)
    header = tensor_pb2.ModelHeader(
        model_uri=model_uri,
        tensors=[s.to_proto() for s in specs],
        total_bytes=total_bytes(specs),
        sha256=sha256 if sha256 is not None else sha256_of(tensors),
    )
    if version is not None:
        header.version = version
    yield tensor_pb2.ModelChunk(header=header)
    for data in iter_chunks(tensors, chunk_size):
        yield tensor_pb2.ModelChunk(data=data)


@dataclass(frozen=True)
class UpdateMeta:
    round_id: str
    proplet_id: str
    base_model_uri: str
    num_samples: int
    metrics: dict[str, float]


def update_stream(
    meta: UpdateMeta, tensors: Mapping[str, Array], chunk_size: int = 0
) -> Iterator[tensor_pb2.UpdateChunk]:
    specs = specs_of(tensors)
    yield tensor_pb2.UpdateChunk(header=update_header(meta, specs))
    for data in iter_chunks(tensors, chunk_size):
        yield tensor_pb2.UpdateChunk(data=data)


def update_header(meta: UpdateMeta, specs: list[Spec]) -> tensor_pb2.UpdateHeader:
    return tensor_pb2.UpdateHeader(
        round_id=meta.round_id,
        proplet_id=meta.proplet_id,
        base_model_uri=meta.base_model_uri,
        num_samples=meta.num_samples,
        metrics=meta.metrics,
        tensors=[s.to_proto() for s in specs],
        total_bytes=total_bytes(specs),
    )


def checked_total(specs: list[Spec], declared: int, field: str) -> int:
    """The bytes `specs` need, once the header's `total_bytes` (0 = not given) agrees, the
    size is one this server assembles, and the tensors are at most `MAX_TENSORS` with names
    that follow the name rule (`server.ids`)."""
    check_count(specs, f"{field}.tensors", MAX_TENSORS)
    for i, spec in enumerate(specs):
        check_name(spec.name, f"{field}.tensors[{i}].name")
    need = total_bytes(specs)
    if declared not in (0, need):
        raise InvalidArgument(f"{field}.total_bytes: {declared}, tensors need {need}")
    if need > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(f"{field}.tensors: {need} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return need


class PayloadBuffer:
    """The tensor bytes of one model or update as they arrive. It grows with the data actually
    received, never to what a header merely claims (a few bytes of header must not make the
    server allocate gigabytes), and refuses a byte more than `need`."""

    def __init__(self, need: int, field: str) -> None:
        self.buf = bytearray()
        self.need = need
        self.field = field

    def add(self, data: bytes) -> None:
        if len(self.buf) + len(data) > self.need:
            raise InvalidArgument(f"{self.field}: more tensor bytes than the header's {self.need}")
        self.buf += data

    @property
    def filled(self) -> int:
        return len(self.buf)

    @property
    def complete(self) -> bool:
        return len(self.buf) == self.need

    def done(self, specs: list[Spec]) -> Tensors:
        """The arrays (views onto the received bytes), once exactly `need` bytes arrived."""
        if len(self.buf) != self.need:
            raise InvalidArgument(
                f"{self.field}: stream ended after {len(self.buf)} of {self.need} tensor bytes"
            )
        return split_payload(self.buf, specs, self.field)


async def drain(stream: AsyncIterator[Any]) -> None:
    """Read and discard the rest of a rejected request stream.

    Aborting while a grpc.aio client is still sending makes it see "INTERNAL: Internal error
    from Core" from its failed write instead of our status; letting it finish first delivers
    the real error. Nothing is kept, so memory stays flat. A message the server could not
    decode (`server.grpc_server` raises InvalidArgument for it) is skipped like the rest.
    """
    while True:
        try:
            await anext(stream)
        except StopAsyncIteration:
            return
        except PropellerError:
            continue


async def _read_stream(
    stream: AsyncIterable[Any], field: str, header_type: type[H]
) -> tuple[H, Tensors]:
    """Shared reader for ModelChunk and UpdateChunk streams (same header/data shape); on a
    rejected stream it drains the rest before raising, so the client gets our status."""
    chunks = aiter(stream)
    try:
        header, tensors = await _assemble(chunks, field)
    except PropellerError:
        await drain(chunks)
        raise
    assert isinstance(header, header_type)
    return header, tensors


async def _assemble(stream: AsyncIterator[Any], field: str) -> tuple[Any, Tensors]:
    header: Any = None
    specs: list[Spec] = []
    buf: PayloadBuffer | None = None
    async for chunk in stream:
        kind = chunk.WhichOneof("part")
        if kind == "header":
            if header is not None:
                raise InvalidArgument(f"{field}: a second header in one stream")
            header = chunk.header
            specs = specs_from_proto(header.tensors, f"{field}.header.tensors")
            if not specs:
                raise InvalidArgument(f"{field}.header.tensors: must list at least one tensor")
            buf = PayloadBuffer(checked_total(specs, header.total_bytes, f"{field}.header"), field)
        elif kind == "data":
            if buf is None:
                raise InvalidArgument(f"{field}: data chunk before the header")
            buf.add(chunk.data)
        else:
            raise InvalidArgument(f"{field}: empty chunk (neither header nor data)")
    if header is None or buf is None:
        raise InvalidArgument(f"{field}: stream ended without a header")
    return header, buf.done(specs)


async def read_model_stream(
    stream: AsyncIterable[tensor_pb2.ModelChunk], field: str = "model"
) -> tuple[tensor_pb2.ModelHeader, Tensors]:
    return await _read_stream(stream, field, tensor_pb2.ModelHeader)


async def read_update_stream(
    stream: AsyncIterable[tensor_pb2.UpdateChunk], field: str = "update"
) -> tuple[tensor_pb2.UpdateHeader, Tensors]:
    return await _read_stream(stream, field, tensor_pb2.UpdateHeader)
