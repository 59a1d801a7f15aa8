"""Chunk streams for models and updates: build them from arrays, read them back with checks.

Readers enforce that the header comes first and exactly once, that no more bytes arrive than
the header promises, and that the stream is not truncated. Every inbound stream is bounded
from its header (`checked_total`: at most `max_bytes`, `MAX_PAYLOAD_BYTES` by default, and a
header check of the caller's, e.g. the round's model size) and counted as it arrives
(`PayloadBuffer`, which spools to a temporary file above a threshold), so what a header
claims never decides what a server allocates, and a rejected upload is answered without
reading gigabytes (`drain` is bounded). A client downloading a model to use it reads it
with `server.downloads.read_model_download`.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from io import BufferedRandom
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from google.protobuf.message import Message

from propeller.v1 import tensor_pb2
from server import metrics
from server.errors import DataLoss, InvalidArgument, PropellerError
from server.ids import MAX_TENSORS, check_count, check_name
from server.tensors import (
    Array,
    Spec,
    Tensors,
    iter_chunks,
    offload_if_big,
    sha256_of,
    specs_from_proto,
    specs_of,
    split_payload,
    tensor_bytes,
    total_bytes,
)
from server.wire import message_from

H = TypeVar("H", tensor_pb2.ModelHeader, tensor_pb2.UpdateHeader)
T = TypeVar("T")

# The most bytes one model or update may have unless a server says less: the largest BLOB
# SQLite stores by default (SQLITE_MAX_LENGTH), so the largest model the registry can hold.
MAX_PAYLOAD_BYTES = 1_000_000_000
# Servers keep an upload's first bytes in memory and spool the rest to a temporary file.
SPOOL_ABOVE = 8 << 20
# Spooled bytes are written in batches of this size (one thread hop each).
_SPOOL_WRITE = 4 << 20
# Reading a payload back piece by piece (hashing, checking, copying into storage).
PIECE_BYTES = 16 << 20
# A rejected stream is read on (and discarded) for at most this many bytes or seconds before
# the answer, so the client sees our status rather than a failed write.
DRAIN_BYTES = 64 << 20
DRAIN_S = 5.0


def model_stream(
    tensors: Mapping[str, Array],
    chunk_size: int,
    *,
    version: int | None = None,
    model_uri: str = "",
    sha256: str | None = None,
    blake3: str = "",
) -> Iterator[tensor_pb2.ModelChunk]:
    """A model as a chunk stream: its header (`sha256` computed unless given; `blake3` only
    when given: the registry states it in GetModel answers), then its bytes."""
    specs = specs_of(tensors)
    header = tensor_pb2.ModelHeader(
        model_uri=model_uri,
        tensors=[s.to_proto() for s in specs],
        total_bytes=total_bytes(specs),
        sha256=sha256 if sha256 is not None else sha256_of(tensors),
        blake3=blake3,
    )
    if version is not None:
        header.version = version
    yield tensor_pb2.ModelChunk(header=header)
    for data in iter_chunks(tensors, chunk_size):
        metrics.streamed("model", "out", len(data))
        yield tensor_pb2.ModelChunk(data=data)


@dataclass(frozen=True)
class UpdateMeta:
    round_id: str
    proplet_id: str
    base_model_uri: str
    num_samples: int
    metrics: dict[str, float]
    # Provenance (`server.provenance`): what the update was trained from, by which module,
    # and its proplet's signature over them.
    base_model_sha256: str = ""
    module_digest: str = ""
    signature: bytes = b""
    # A site coordinator's partial: the participants whose updates it combines.
    contributors: tuple[str, ...] = ()
    # The wasmtime fuel the training run consumed (0: not metered); signed with the rest.
    fuel_consumed: int = 0


def update_stream(
    meta: UpdateMeta, tensors: Mapping[str, Array], chunk_size: int = 0
) -> Iterator[tensor_pb2.UpdateChunk]:
    specs = specs_of(tensors)
    yield tensor_pb2.UpdateChunk(header=update_header(meta, specs))
    for data in iter_chunks(tensors, chunk_size):
        metrics.streamed("update", "out", len(data))
        yield tensor_pb2.UpdateChunk(data=data)


def update_header(meta: UpdateMeta, specs: list[Spec]) -> tensor_pb2.UpdateHeader:
    return message_from(
        tensor_pb2.UpdateHeader,
        meta,
        tensors=[s.to_proto() for s in specs],
        total_bytes=total_bytes(specs),
    )


def checked_total(
    specs: list[Spec], declared: int, field: str, max_bytes: int = MAX_PAYLOAD_BYTES
) -> int:
    """The bytes `specs` need, once the header's `total_bytes` (0 = not given) agrees, the
    size is at most `max_bytes` (what this server takes), and the tensors are at most
    `MAX_TENSORS` with names that follow the name rule (`server.ids`). Checked from the header
    alone, before any data arrives."""
    check_count(specs, f"{field}.tensors", MAX_TENSORS)
    for i, spec in enumerate(specs):
        check_name(spec.name, f"{field}.tensors[{i}].name")
    need = total_bytes(specs)
    if declared not in (0, need):
        raise InvalidArgument(f"{field}.total_bytes: {declared}, tensors need {need}")
    if need > max_bytes:
        raise InvalidArgument(
            f"{field}.tensors: {need} bytes, more than the {max_bytes} this server takes"
        )
    return need


def header_specs(header: Any, field: str, max_bytes: int) -> tuple[list[Spec], int]:
    """A stream header's tensor specs (at least one) and the bytes they promise, bounded by
    `max_bytes`; INVALID_ARGUMENT naming `field`'s header otherwise."""
    specs = specs_from_proto(header.tensors, f"{field}.header.tensors")
    if not specs:
        raise InvalidArgument(f"{field}.header.tensors: must list at least one tensor")
    return specs, checked_total(specs, header.total_bytes, f"{field}.header", max_bytes)


class Payload:
    """The tensor bytes of one model or update, concatenated in the order of `specs`: in
    memory, or in a temporary file when they were spooled (`PayloadBuffer`). Reading a spooled
    payload is blocking file I/O: run `tensors`, `pieces` and `sha256` off the event loop
    (`offload_if_big(payload.nbytes, ...)`). `close()` releases the file."""

    def __init__(
        self,
        specs: Sequence[Spec],
        field: str,
        *,
        memory: bytes | bytearray | None = None,
        file: BufferedRandom | None = None,
    ) -> None:
        self.specs = tuple(specs)
        self.field = field
        self.nbytes = total_bytes(specs)
        self._memory = memory
        self._file = file

    @classmethod
    def of(cls, tensors: Mapping[str, Array], field: str = "model") -> Payload:
        """Arrays in memory as a payload (their bytes copied into one buffer)."""
        return cls(specs_of(tensors), field, memory=tensor_bytes(tensors))

    @property
    def spooled(self) -> bool:
        return self._file is not None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def tensors(self) -> Tensors:
        """The arrays: views onto the bytes in memory, or read back from the spool file."""
        if self._file is None:
            assert self._memory is not None
            return split_payload(self._memory, self.specs, self.field)
        data = bytearray(self.nbytes)
        view = memoryview(data)
        self._file.seek(0)
        filled = 0
        while filled < self.nbytes:
            n = self._file.readinto(view[filled:])
            if not n:
                raise DataLoss(f"{self.field}: spool file ended after {filled} bytes")
            filled += n
        return split_payload(data, self.specs, self.field)

    def pieces(self, size: int = PIECE_BYTES) -> Iterator[tuple[Spec, memoryview]]:
        """Each tensor's bytes in order, in pieces of at most `size` bytes (whole elements),
        without holding more than one piece of a spooled payload in memory."""
        offset = 0
        for spec in self.specs:
            step = max(spec.dtype.itemsize, size - size % spec.dtype.itemsize)
            end = offset + spec.nbytes
            for start in range(offset, end, step):
                n = min(step, end - start)
                if self._file is None:
                    assert self._memory is not None
                    yield spec, memoryview(self._memory)[start : start + n]
                else:
                    self._file.seek(start)
                    data = self._file.read(n)
                    if len(data) != n:
                        raise DataLoss(f"{self.field}: spool file ended early")
                    yield spec, memoryview(data)
            offset = end

    def sha256(self, finite_field: str | None = None) -> str:
        """The hex sha256 of the bytes, read piece by piece; with `finite_field`, also
        INVALID_ARGUMENT ("{finite_field}.{tensor}: contains NaN or Inf") for a value that is
        not finite."""
        h = hashlib.sha256()
        for spec, piece in self.pieces():
            if finite_field is not None and not np.isfinite(np.frombuffer(piece, spec.dtype)).all():
                raise InvalidArgument(f"{finite_field}.{spec.name}: contains NaN or Inf")
            h.update(piece)
        return h.hexdigest()


class PayloadBuffer:
    """The tensor bytes of one model or update as they arrive. It grows with the data actually
    received, never to what a header merely claims (a few bytes of header must not make the
    server allocate gigabytes), and refuses a byte more than `need`.

    With `spool_above` (servers pass `SPOOL_ABOVE`), more than that many bytes go to an
    unnamed temporary file (in `spool_dir`, else the system's; gone with the process whatever
    happens), written off the event loop in batches: an upload in progress holds at most
    about `spool_above` bytes of memory however big it is, however slowly it arrives.
    `close()` releases the file of an upload that is given up."""

    def __init__(
        self,
        need: int,
        field: str,
        *,
        spool_above: int | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self.need = need
        self.field = field
        self.filled = 0
        self.spool_above = spool_above
        self.spool_dir = spool_dir
        self._held = bytearray()
        self._file: BufferedRandom | None = None

    async def add(self, data: bytes) -> None:
        if self.filled + len(data) > self.need:
            raise InvalidArgument(f"{self.field}: more tensor bytes than the header's {self.need}")
        self._held += data
        self.filled += len(data)
        if self._file is None:
            if self.spool_above is None or len(self._held) <= self.spool_above:
                return
            self._file = await asyncio.to_thread(tempfile.TemporaryFile, dir=self.spool_dir)
        if len(self._held) >= _SPOOL_WRITE or self.complete:
            await self._write()

    async def _write(self) -> None:
        assert self._file is not None
        held, self._held = self._held, bytearray()
        await asyncio.to_thread(self._file.write, held)

    @property
    def complete(self) -> bool:
        return self.filled == self.need

    def close(self) -> None:
        self._held = bytearray()
        if self._file is not None:
            self._file.close()

    async def payload(self, specs: Sequence[Spec]) -> Payload:
        """The bytes received, once exactly `need` arrived; the payload owns them (and the
        spool file) from now on."""
        if not self.complete:
            raise InvalidArgument(
                f"{self.field}: stream ended after {self.filled} of {self.need} tensor bytes"
            )
        if self._file is None:
            return Payload(specs, self.field, memory=self._held)
        if self._held:
            await self._write()
        file, self._file = self._file, None
        return Payload(specs, self.field, file=file)

    async def done(self, specs: Sequence[Spec]) -> Tensors:
        """The arrays, once exactly `need` bytes arrived (views onto the received bytes, or
        read back from the spool file in a thread)."""
        payload = await self.payload(specs)
        try:
            return await offload_if_big(payload.nbytes if payload.spooled else 0, payload.tensors)
        finally:
            payload.close()


async def drain(
    stream: AsyncIterator[Any], max_bytes: int = DRAIN_BYTES, max_s: float = DRAIN_S
) -> None:
    """Read and discard the rest of a rejected request stream, up to `max_bytes` or `max_s`.

    Aborting while a grpc.aio client is still sending can make it see "INTERNAL: Internal
    error from Core" from its failed write instead of our status; letting it finish first
    delivers the real error. Nothing is kept, so memory stays flat. A message the server could
    not decode (`server.grpc_server` raises InvalidArgument for it) is skipped like the rest.
    A stream longer than the bounds (a 2 GiB upload refused at its header, a client that never
    stops) is answered without reading it all: the bandwidth and the time are not spent.
    """
    read = 0
    try:
        async with asyncio.timeout(max_s):
            while read <= max_bytes:
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
                    return
                except PropellerError:
                    continue
                read += chunk.ByteSize() if isinstance(chunk, Message) else 0
    except TimeoutError:
        return


# Checks an inbound stream's header once its size is known (`need` bytes), before any data:
# e.g. that the round exists and takes that many bytes.
HeaderCheck = Callable[[Any, int], Awaitable[None]]


async def _read_stream(
    stream: AsyncIterable[Any],
    field: str,
    header_type: type[H],
    *,
    max_bytes: int,
    spool_above: int | None,
    on_header: HeaderCheck | None = None,
) -> tuple[H, Payload]:
    """Shared reader for ModelChunk and UpdateChunk streams (same header/data shape); on a
    rejected stream it drains (some of) the rest before raising, so the client gets our
    status."""
    chunks = aiter(stream)
    try:
        header, payload = await _assemble(chunks, field, max_bytes, spool_above, on_header)
    except PropellerError:
        await drain(chunks)
        raise
    assert isinstance(header, header_type)
    kind: Literal["model", "update"] = (
        "update" if header_type is tensor_pb2.UpdateHeader else "model"
    )
    metrics.streamed(kind, "in", payload.nbytes)
    return header, payload


async def _assemble(
    stream: AsyncIterator[Any],
    field: str,
    max_bytes: int,
    spool_above: int | None,
    on_header: HeaderCheck | None,
) -> tuple[Any, Payload]:
    header: Any = None
    specs: list[Spec] = []
    buf: PayloadBuffer | None = None
    try:
        async for chunk in stream:
            kind = chunk.WhichOneof("part")
            if kind == "header":
                if header is not None:
                    raise InvalidArgument(f"{field}: a second header in one stream")
                header = chunk.header
                specs, need = header_specs(header, field, max_bytes)
                if on_header is not None:
                    await on_header(header, need)
                buf = PayloadBuffer(need, field, spool_above=spool_above)
            elif kind == "data":
                if buf is None:
                    raise InvalidArgument(f"{field}: data chunk before the header")
                await buf.add(chunk.data)
            else:
                raise InvalidArgument(f"{field}: empty chunk (neither header nor data)")
        if header is None or buf is None:
            raise InvalidArgument(f"{field}: stream ended without a header")
        return header, await buf.payload(specs)
    except BaseException:
        if buf is not None:
            buf.close()
        raise


async def read_model_payload(
    stream: AsyncIterable[tensor_pb2.ModelChunk],
    field: str = "model",
    *,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    spool_above: int | None = SPOOL_ABOVE,
) -> tuple[tensor_pb2.ModelHeader, Payload]:
    """A model upload as a `Payload` (spooled to a file above `spool_above` bytes), refused
    from its header when it needs more than `max_bytes`. The caller closes the payload."""
    return await _read_stream(
        stream, field, tensor_pb2.ModelHeader, max_bytes=max_bytes, spool_above=spool_above
    )


async def _tensors_of(read: Awaitable[tuple[H, Payload]]) -> tuple[H, Tensors]:
    header, payload = await read
    try:
        return header, await offload_if_big(
            payload.nbytes if payload.spooled else 0, payload.tensors
        )
    finally:
        payload.close()


async def read_model_stream(
    stream: AsyncIterable[tensor_pb2.ModelChunk], field: str = "model"
) -> tuple[tensor_pb2.ModelHeader, Tensors]:
    """A model stream as arrays, held in memory (clients reading a model), up to
    `MAX_PAYLOAD_BYTES`."""
    return await _tensors_of(read_model_payload(stream, field, spool_above=None))


async def read_update_stream(
    stream: AsyncIterable[tensor_pb2.UpdateChunk],
    field: str = "update",
    *,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    spool_above: int | None = None,
    on_header: HeaderCheck | None = None,
) -> tuple[tensor_pb2.UpdateHeader, Tensors]:
    """An update stream as arrays; `on_header(header, need)` may refuse it from its header
    (before any data arrives)."""
    return await _tensors_of(
        _read_stream(
            stream,
            field,
            tensor_pb2.UpdateHeader,
            max_bytes=max_bytes,
            spool_above=spool_above,
            on_header=on_header,
        )
    )
