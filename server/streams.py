"""Chunk streams for models and updates: build them from arrays, read them back with checks.

Readers enforce that the header comes first and exactly once, that no more bytes arrive than
the header promises, and that the stream is not truncated. Every inbound stream is bounded
from its header (`checked_total`: at most `max_bytes`, `MAX_PAYLOAD_BYTES` by default, and a
header check of the caller's, e.g. the round's model size) and counted as it arrives
(`PayloadBuffer`, which spools to a temporary file above a threshold), so what a header
claims never decides what a server allocates, and a rejected upload is answered without
reading gigabytes (`drain` is bounded). A client downloading a model to use it
(`read_model_download`) reserves the header's size at once (address space only; memory is
committed as bytes arrive) and checks them against the digest its header states.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import sys
import tempfile
import threading
from collections.abc import (
    AsyncGenerator,
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
from typing import Any, Literal, TypeVar, cast

import grpc
import numpy as np
from google.protobuf.message import Message

from propeller.v1 import tensor_pb2
from server import metrics
from server.errors import DataLoss, InvalidArgument, PropellerError
from server.ids import MAX_TENSORS, check_count, check_name
from server.tensors import (
    DIGESTS,
    Array,
    Hasher,
    Spec,
    Tensors,
    iter_chunks,
    offload_if_big,
    sha256_of,
    specs_from_proto,
    specs_of,
    split_payload,
    tensor_bytes,
    tensors_from_bytes,
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


def _header_specs(header: Any, field: str, max_bytes: int) -> tuple[list[Spec], int]:
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
                specs, need = _header_specs(header, field, max_bytes)
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


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
# A model download reads this many chunks ahead of the one being placed and hashed.
_READ_AHEAD = 8
# A model download's hashing thread is woken once per this many bytes placed.
_HASH_BATCH = 4 << 20


class _SpareBuffer:
    """The latest model download's buffer, handed to the next download of the same size once
    nothing holds an array over it any more: a proplet downloads a model of the same size
    every round, and writing pages it already has costs less than having fresh ones faulted
    in and zeroed (~10 ms per 100 MB here: docs/benchmarks.md, "transfer"). One buffer at a
    time; "nothing holds it" is its reference count (every array over it, and the memoryview
    under them, holds a reference), checked under a lock (downloads may run on several
    threads' loops)."""

    # References to an unheld buffer while `take` looks at it: the slot, `spare`, and
    # getrefcount's own argument.
    _UNHELD = 3

    def __init__(self) -> None:
        self._buffer: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self._lock = threading.Lock()

    def take(self, need: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        with self._lock:
            spare = self._buffer
            if (
                spare is not None
                and spare.nbytes == need
                and sys.getrefcount(spare) == self._UNHELD
            ):
                return spare
            # Reserved, not written: memory is committed as bytes arrive.
            self._buffer = fresh = np.empty(need, dtype=np.uint8)
            return fresh


_SPARE = _SpareBuffer()


class _HashBehind:
    """Hashes a buffer on a thread of its own, behind the loop that fills it: told how far the
    buffer is filled once per `_HASH_BATCH` bytes (one wake-up per batch, not per chunk), it
    hashes up to there. hashlib and blake3 release the GIL, so the loop goes on receiving
    and placing the next chunks meanwhile."""

    def __init__(self, view: memoryview, hasher: Hasher, field: str) -> None:
        self._view = view
        self._hash = hasher
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._cv = threading.Condition()
        self._told = 0  # filled up to here, as far as the thread was told
        self._end = False
        self._stop = False
        self._thread = threading.Thread(target=self._work, name=f"hash-{field}", daemon=True)
        self._thread.start()

    def advance(self, filled: int) -> None:
        if filled - self._told >= _HASH_BATCH:
            with self._cv:
                self._told = filled
                self._cv.notify()

    async def hexdigest(self, filled: int) -> str:
        with self._cv:
            self._told, self._end = filled, True
            self._cv.notify()
        await self._done
        return self._hash.hexdigest()

    def stop(self) -> None:
        """A download given up: the thread ends without finishing (nobody awaits it)."""
        with self._cv:
            self._stop = True
            self._cv.notify()

    def _work(self) -> None:
        hashed = 0
        error: BaseException | None = None
        while True:
            with self._cv:
                while self._told == hashed and not self._end and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                upto, end = self._told, self._end
            if upto > hashed and error is None:
                try:
                    self._hash.update(self._view[hashed:upto])
                except BaseException as exc:  # handed to the reader, which raises it
                    error = exc
            hashed = upto
            if end:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    self._loop.call_soon_threadsafe(self._settle, error)
                return

    def _settle(self, error: BaseException | None) -> None:
        if self._done.done():
            return
        if error is None:
            self._done.set_result(None)
        else:
            self._done.set_exception(error)


class _CheckedAssembly:
    """A downloaded model's bytes as they arrive: copied into one buffer of the size the
    header promises on the event loop, hashed behind it on a thread (`_HashBehind`; models of
    at most `_HASH_BATCH` bytes on the loop), then checked against the header's digest:
    BLAKE3 when the header states one (the registry's answers do), else sha256.

    The buffer is reserved, not written: numpy's `empty` leaves the pages untouched, so memory
    is committed only as bytes arrive (a header that lies about the size costs address space,
    not memory), and the count is checked on every chunk; or it is the previous download's,
    when nothing holds that one any more (`_SpareBuffer`). `close()` stops the hashing
    thread of a download given up."""

    def __init__(self, header: tensor_pb2.ModelHeader, need: int, field: str) -> None:
        self.need = need
        self.field = field
        self.filled = 0
        self.algorithm = "blake3" if header.blake3 else "sha256"
        self.expected: str = getattr(header, self.algorithm)
        if not _HEX_DIGEST.fullmatch(self.expected):
            raise InvalidArgument(
                f"{field}.header.{self.algorithm}: must be 64 lowercase hex digits, "
                f"got {self.expected[:80]!r}"
            )
        self._buffer = _SPARE.take(need)
        self._view = self._buffer.data
        self._hash = DIGESTS[self.algorithm]()
        self._behind = _HashBehind(self._view, self._hash, field) if need > _HASH_BATCH else None

    def add(self, data: bytes | memoryview) -> None:
        if self.filled + len(data) > self.need:
            raise InvalidArgument(f"{self.field}: more tensor bytes than the header's {self.need}")
        offset, self.filled = self.filled, self.filled + len(data)
        self._buffer[offset : self.filled] = np.frombuffer(data, dtype=np.uint8)
        if self._behind is None:
            self._hash.update(data)
        else:
            self._behind.advance(self.filled)

    async def finish(self, specs: Sequence[Spec]) -> Tensors:
        """The arrays (writable views of the one buffer), once exactly `need` bytes arrived and
        they have the header's digest; DATA_LOSS naming the digest otherwise."""
        if self.filled != self.need:
            raise InvalidArgument(
                f"{self.field}: stream ended after {self.filled} of {self.need} tensor bytes"
            )
        if self._behind is None:
            got = self._hash.hexdigest()
        else:
            got = await self._behind.hexdigest(self.filled)
        if got != self.expected:
            raise DataLoss(
                f"{self.field}: the bytes that arrived have {self.algorithm} {got}, "
                f"the header states {self.expected}"
            )
        return tensors_from_bytes(self._view, specs)

    def close(self) -> None:
        if self._behind is not None:
            self._behind.stop()


# ModelRegistry.GetModel, called for its answers as raw bytes (`model_download_call`).
GET_MODEL_METHOD = "/propeller.v1.ModelRegistry/GetModel"
# A serialized ModelChunk whose part is `data` (field 2, length-delimited) starts with this.
_DATA_TAG = 0x12


def model_download_call(
    channel: grpc.aio.Channel, request: Message, *, timeout: float
) -> AsyncIterable[bytes]:
    """GetModel with its answers left serialized: `read_model_download` takes a data chunk's
    bytes as a view of the message instead of a parsed copy."""
    call = channel.unary_stream(
        GET_MODEL_METHOD,
        request_serializer=type(request).SerializeToString,
        response_deserializer=None,
    )(request, timeout=timeout)
    return cast(AsyncIterable[bytes], call)


def _data_view(message: bytes) -> memoryview | None:
    """The `data` bytes of a serialized ModelChunk that holds exactly one data field (what
    every encoder writes for it), as a view of `message`; None for anything else (a header,
    an empty chunk, another layout), which the caller parses in full."""
    if not message or message[0] != _DATA_TAG:
        return None
    length, shift, i = 0, 0, 1
    while i < len(message) and i <= 10:
        byte = message[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return memoryview(message)[i:] if i + length == len(message) else None
        shift += 7
    return None


async def read_model_download(
    stream: AsyncIterable[bytes] | AsyncIterable[tensor_pb2.ModelChunk],
    field: str = "model",
    *,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> tuple[tensor_pb2.ModelHeader, Tensors]:
    """A model stream as a client downloads it to use it: the header and the arrays, whose
    bytes are checked against the header's digest as they arrive (`_CheckedAssembly`: BLAKE3
    when stated, else sha256; DATA_LOSS on a mismatch), so the header's sha256 names what
    arrived. The stream's items are ModelChunk messages or their serialized bytes
    (`model_download_call`: no parse, no copy of a data chunk). The same checks as
    `read_model_stream` (header first and once, at most `max_bytes`, no byte more or less than
    the header promises); the bytes land in one buffer (no assembly pass, no second copy).
    A big model's chunks are read up to `_READ_AHEAD` ahead by a task of their own
    (`_read_ahead`), so gRPC receives the next ones while this one is placed."""
    header: tensor_pb2.ModelHeader | None = None
    specs: list[Spec] = []
    assembly: _CheckedAssembly | None = None

    def take(item: bytes | tensor_pb2.ModelChunk) -> None:
        nonlocal header, specs, assembly
        if isinstance(item, bytes):
            data = _data_view(item)
            if data is not None:
                if assembly is None:
                    raise InvalidArgument(f"{field}: data chunk before the header")
                assembly.add(data)
                return
            chunk = tensor_pb2.ModelChunk.FromString(item)
        else:
            chunk = item
        kind = chunk.WhichOneof("part")
        if kind == "data":
            if assembly is None:
                raise InvalidArgument(f"{field}: data chunk before the header")
            assembly.add(chunk.data)
        elif kind == "header":
            if header is not None:
                raise InvalidArgument(f"{field}: a second header in one stream")
            header = chunk.header
            specs, need = _header_specs(header, field, max_bytes)
            assembly = _CheckedAssembly(header, need, field)
        else:
            raise InvalidArgument(f"{field}: empty chunk (neither header nor data)")

    items = aiter(cast(AsyncIterable[bytes | tensor_pb2.ModelChunk], stream))
    try:
        first = await anext(items, None)
        if first is not None:
            take(first)
            # What follows the header of a big model is read ahead; a small one's few chunks
            # are not worth a task.
            if assembly is not None and assembly.need > _HASH_BATCH:
                async with contextlib.aclosing(_read_ahead(items)) as ahead:
                    async for item in ahead:
                        take(item)
            else:
                async for item in items:
                    take(item)
        if header is None or assembly is None:
            raise InvalidArgument(f"{field}: stream ended without a header")
        tensors = await assembly.finish(specs)
        metrics.streamed("model", "in", assembly.need)
        return header, tensors
    finally:
        if assembly is not None:
            assembly.close()


class _Ended:
    """The end of a stream read ahead: how it ended (None: all of it was read)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


async def _pump(
    stream: AsyncIterable[T], items: asyncio.Queue[T | _Ended], room: asyncio.Semaphore
) -> None:
    try:
        async for item in stream:
            items.put_nowait(item)
            await room.acquire()
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # handed to the reader, which raises it
        items.put_nowait(_Ended(exc))
    else:
        items.put_nowait(_Ended(None))


async def _read_ahead(
    stream: AsyncIterable[T], depth: int = _READ_AHEAD
) -> AsyncGenerator[T, None]:
    """The items of `stream`, requested by a task of its own up to `depth` ahead of the one
    the caller holds (a gRPC stream asks for its next message only when it is iterated); a
    failure of the stream is raised here, and the task is cancelled when the caller stops."""
    items: asyncio.Queue[T | _Ended] = asyncio.Queue()
    room = asyncio.Semaphore(depth)
    pump = asyncio.ensure_future(_pump(stream, items, room))
    try:
        while not isinstance(item := await items.get(), _Ended):
            room.release()
            yield item
        if item.error is not None:
            raise item.error
    finally:
        if not pump.done():
            pump.cancel()
            await asyncio.wait({pump})
