"""A client's download of a model to use it (the proplet's base-model fetch): `ModelRegistry
.GetModel` called for its answers as raw bytes (`model_download_call`), read by
`read_model_download` with the checks of `server.streams`' readers, the bytes placed into one
buffer as they arrive, read ahead, hashed behind the loop and checked against the digest the
header states (BLAKE3 when stated, else sha256). docs/architecture.md, "Model downloads";
the figures in docs/benchmarks.md, "transfer".
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from typing import Any, TypeVar, cast

import grpc
import numpy as np
from google.protobuf.message import Message

from propeller.v1 import tensor_pb2
from server import metrics
from server.errors import DataLoss, InvalidArgument
from server.streams import MAX_PAYLOAD_BYTES, header_specs
from server.tensors import DIGESTS, Hasher, Spec, Tensors, tensors_from_bytes

T = TypeVar("T")

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
            specs, need = header_specs(header, field, max_bytes)
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
