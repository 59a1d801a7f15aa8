"""The one assembler of inbound tensor bytes (`server.streams`), and a client's model download
(`server.downloads`): counted as they arrive,
spooled to a temporary file above a threshold, read back piece by piece or whole; and the
bounded draining of a rejected stream."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import threading
from collections.abc import AsyncIterator
from typing import Any

import blake3
import numpy as np
import pytest

from propeller.v1 import tensor_pb2
from server.downloads import _READ_AHEAD, read_model_download
from server.errors import DataLoss, InvalidArgument
from server.streams import (
    Payload,
    PayloadBuffer,
    checked_total,
    drain,
    model_stream,
    read_model_payload,
    read_model_stream,
)
from server.tensors import Spec, blake3_of, sha256_of, specs_of, tensor_bytes
from tests.support.waits import eventually

MIB = 1 << 20
TENSORS = {
    "w": np.arange(3 * MIB, dtype="<f4").reshape(MIB, 3),
    "b": np.asarray(0.5, dtype="<f8"),
    "empty": np.zeros((0, 4), dtype="<f8"),
    "v": np.linspace(-1.0, 1.0, 1000, dtype="<f8"),
}
BYTES = bytes(tensor_bytes(TENSORS))
SPECS = specs_of(TENSORS)


async def filled(spool_above: int | None, chunk: int = 1000_003) -> PayloadBuffer:
    buf = PayloadBuffer(len(BYTES), "model", spool_above=spool_above)
    for start in range(0, len(BYTES), chunk):
        await buf.add(BYTES[start : start + chunk])
    return buf


@pytest.mark.parametrize("spool_above", [None, 1 << 20])
async def test_a_payload_reads_back_the_same_in_memory_or_spooled(spool_above: int | None) -> None:
    payload = await (await filled(spool_above)).payload(SPECS)
    try:
        assert payload.spooled == (spool_above is not None)
        got = payload.tensors()
        assert list(got) == list(TENSORS)
        for name, arr in TENSORS.items():
            assert got[name].dtype == arr.dtype and np.array_equal(got[name], arr), name
        pieces = list(payload.pieces(size=MIB + 3))
        assert b"".join(bytes(p) for _, p in pieces) == BYTES
        assert all(len(p) <= MIB + 3 and len(p) % s.dtype.itemsize == 0 for s, p in pieces)
        assert payload.sha256(finite_field="model") == hashlib.sha256(BYTES).hexdigest()
    finally:
        payload.close()


async def test_small_payloads_stay_in_memory() -> None:
    payload = await (await filled(len(BYTES))).payload(SPECS)
    assert not payload.spooled


async def test_done_gives_the_arrays_of_a_spooled_payload() -> None:
    got = await (await filled(1 << 20)).done(SPECS)
    assert np.array_equal(got["w"], TENSORS["w"]) and got["w"].flags.writeable


async def test_the_finite_check_names_the_tensor_in_any_piece() -> None:
    bad = dict(TENSORS, v=TENSORS["v"].copy())
    bad["v"][999] = np.nan
    payload = Payload.of(bad)
    with pytest.raises(InvalidArgument, match=r"^model\.v: contains NaN or Inf"):
        payload.sha256(finite_field="model")


async def test_a_byte_more_than_promised_is_refused() -> None:
    buf = PayloadBuffer(10, "update", spool_above=4)
    await buf.add(b"\0" * 10)
    with pytest.raises(InvalidArgument, match="more tensor bytes than the header's 10"):
        await buf.add(b"\0")
    buf.close()


async def test_a_short_stream_is_refused() -> None:
    buf = PayloadBuffer(10, "update", spool_above=4)
    await buf.add(b"\0" * 6)
    with pytest.raises(InvalidArgument, match="stream ended after 6 of 10 tensor bytes"):
        await buf.payload([Spec("w", np.dtype("<f8"), (1,)), Spec("x", np.dtype("<f2"), (1,))])
    buf.close()


def test_the_header_alone_bounds_the_size() -> None:
    specs = [Spec("w", np.dtype("<f8"), (1 << 28,))]
    with pytest.raises(InvalidArgument, match=r"^model.header.tensors: 2147483648 bytes, more"):
        checked_total(specs, 0, "model.header", max_bytes=1 << 30)
    with pytest.raises(InvalidArgument, match=r"^model.header.tensors\[0\].name: "):
        checked_total([Spec("a/b", np.dtype("<f8"), (1,))], 0, "model.header")
    many = [Spec(f"t{i}", np.dtype("<f8"), (1,)) for i in range(4097)]
    with pytest.raises(InvalidArgument, match=r"^model.header.tensors: 4097 entries"):
        checked_total(many, 0, "model.header")


async def aiter_of(items: list[tensor_pb2.ModelChunk]) -> AsyncIterator[tensor_pb2.ModelChunk]:
    for item in items:
        yield item


async def test_readers_round_trip_with_and_without_spooling() -> None:
    chunks = list(model_stream(TENSORS, 777_777))
    header, tensors = await read_model_stream(aiter_of(chunks))
    assert tensor_bytes(tensors) == BYTES and header.total_bytes == len(BYTES)
    header, payload = await read_model_payload(aiter_of(chunks), spool_above=MIB)
    assert payload.spooled and bytes(tensor_bytes(payload.tensors())) == BYTES
    payload.close()


async def test_a_reader_refuses_from_the_header_and_drains_the_rest() -> None:
    pulled = 0

    async def stream() -> AsyncIterator[tensor_pb2.ModelChunk]:
        nonlocal pulled
        for chunk in model_stream(TENSORS, MIB):
            pulled += 1
            yield chunk

    with pytest.raises(InvalidArgument, match=r"^model.header.tensors: \d+ bytes, more than"):
        await read_model_payload(stream(), max_bytes=MIB)
    assert pulled == len(list(model_stream(TENSORS, MIB)))  # the rest drained (it is short)


async def test_draining_is_bounded_in_bytes_and_time() -> None:
    pulled = 0

    async def endless() -> AsyncIterator[tensor_pb2.ModelChunk]:
        nonlocal pulled
        while True:
            pulled += 1
            yield tensor_pb2.ModelChunk(data=b"\0" * MIB)

    await drain(endless(), max_bytes=10 * MIB)
    assert 10 <= pulled <= 12

    async def silent() -> AsyncIterator[tensor_pb2.ModelChunk]:
        yield tensor_pb2.ModelChunk(data=b"\0")
        await asyncio.Event().wait()  # a client that never sends again nor ends
        yield tensor_pb2.ModelChunk()

    # Returns by its own bound (the outer one only turns a hang into a failure).
    await asyncio.wait_for(drain(silent(), max_s=0.2), 30)


# --- the client's model download (issue 12): placed and hashed as the chunks arrive --------


async def items_of(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def serialized(chunks: list[tensor_pb2.ModelChunk]) -> list[bytes]:
    """The chunks as `model_download_call` yields them: unparsed."""
    return [c.SerializeToString() for c in chunks]


SMALL = {"w": np.arange(12, dtype="<f8").reshape(4, 3), "b": np.asarray(-1.5, dtype="<f8")}


@pytest.mark.parametrize("stated", ["blake3", "sha256"])
@pytest.mark.parametrize("raw", [False, True], ids=["messages", "bytes"])
@pytest.mark.parametrize(
    ("tensors", "chunk"),
    [(TENSORS, MIB), (TENSORS, 1000_003), (SMALL, 7), (SMALL, MIB)],
    ids=["12MB-1MiB", "12MB-odd", "small-7B", "small-1chunk"],
)
async def test_a_download_gives_the_arrays_whose_bytes_have_the_stated_digest(
    raw: bool, tensors: dict[str, np.ndarray], chunk: int, stated: str
) -> None:
    """Checked against BLAKE3 when the header states it (the registry's answers), else sha256
    (an older registry's)."""
    b3 = blake3_of(tensors) if stated == "blake3" else ""
    chunks = list(model_stream(tensors, chunk, model_uri="fl/models/global_model_v1", blake3=b3))
    items: list[Any] = serialized(chunks) if raw else chunks
    header, got = await read_model_download(items_of(items))
    assert header.model_uri == "fl/models/global_model_v1" and header.blake3 == b3
    assert header.sha256 == hashlib.sha256(tensor_bytes(tensors)).hexdigest() == sha256_of(got)
    assert blake3_of(got) == blake3.blake3(tensor_bytes(tensors)).hexdigest()
    assert list(got) == list(tensors)
    for name, arr in tensors.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        np.testing.assert_array_equal(got[name], arr)
        assert got[name].flags.writeable  # the caller's own arrays, like read_model_stream's


@pytest.mark.parametrize("raw", [False, True], ids=["messages", "bytes"])
@pytest.mark.parametrize("stated", ["blake3", "sha256"])
async def test_a_download_checks_the_bytes_that_came_not_what_the_header_says(
    stated: str, raw: bool
) -> None:
    b3 = blake3_of(TENSORS) if stated == "blake3" else ""
    chunks = list(model_stream(TENSORS, chunk_size=MIB, blake3=b3))
    tampered = bytearray(chunks[5].data)
    tampered[-1] ^= 0x01  # one bit of one value, in the middle of the stream
    chunks[5] = tensor_pb2.ModelChunk(data=bytes(tampered))
    items: list[Any] = serialized(chunks) if raw else chunks
    with pytest.raises(DataLoss, match=f"^model: the bytes that arrived have {stated} ") as exc:
        await read_model_download(items_of(items))
    assert f"the header states {b3 or sha256_of(TENSORS)}" in str(exc.value)


async def test_the_stated_blake3_is_the_one_checked() -> None:
    """A header whose sha256 is right but whose BLAKE3 is not is refused: BLAKE3, when stated,
    is what the bytes are checked against (and a malformed digest is refused from the header)."""
    wrong = blake3_of({"w": SMALL["w"] + 1})
    chunks = list(model_stream(SMALL, chunk_size=MIB, blake3=wrong))
    with pytest.raises(DataLoss, match=f"the header states {wrong}"):
        await read_model_download(items_of(chunks))
    for field, bad in (("blake3", "ab" * 31), ("blake3", "AB" * 32), ("sha256", "")):
        header = tensor_pb2.ModelChunk(header=chunks[0].header)
        setattr(header.header, field, bad)
        if field == "sha256":
            header.header.blake3 = ""
        with pytest.raises(
            InvalidArgument, match=rf"^model\.header\.{field}: must be 64 lowercase"
        ):
            await read_model_download(items_of([header, *chunks[1:]]))


def _data_twice(first: bytes, second: bytes) -> bytes:
    """A ModelChunk with its `data` field written twice: valid protobuf, the last one wins."""
    one = tensor_pb2.ModelChunk(data=first).SerializeToString()
    return one + tensor_pb2.ModelChunk(data=second).SerializeToString()


async def test_unusual_encodings_are_parsed_as_protobuf_says() -> None:
    chunks = list(model_stream(SMALL, chunk_size=8, blake3=blake3_of(SMALL)))
    items = serialized(chunks)
    # The first data chunk written twice (the first copy garbage), then an unknown field.
    items[1] = _data_twice(b"\xff" * 8, tensor_pb2.ModelChunk.FromString(items[1]).data)
    items[2] = items[2] + b"\x18\x01"  # field 3, varint 1: unknown, ignored
    _, got = await read_model_download(items_of(items))
    np.testing.assert_array_equal(got["w"], SMALL["w"])
    assert sha256_of(got) == sha256_of(SMALL)


def _header(tensors: dict[str, np.ndarray]) -> tensor_pb2.ModelChunk:
    return next(iter(model_stream(tensors, MIB)))


BAD_DOWNLOADS: list[tuple[str, list[tensor_pb2.ModelChunk], str]] = [
    ("no header", [tensor_pb2.ModelChunk(data=b"12345678")], "data chunk before the header"),
    ("nothing", [], "stream ended without a header"),
    ("two headers", [_header(SMALL), _header(SMALL)], "a second header in one stream"),
    ("empty chunk", [_header(SMALL), tensor_pb2.ModelChunk()], "empty chunk"),
    (
        "truncated",
        list(model_stream(TENSORS, chunk_size=MIB))[:-1],
        f"stream ended after {12 * MIB + 8} of {len(BYTES)} tensor bytes",
    ),
    (
        "a byte more",
        [*model_stream(SMALL, MIB), tensor_pb2.ModelChunk(data=b"x")],
        "more tensor bytes than the header's 104",
    ),
]


@pytest.mark.parametrize("raw", [False, True], ids=["messages", "bytes"])
@pytest.mark.parametrize(
    ("chunks", "needle"),
    [(c, n) for _, c, n in BAD_DOWNLOADS],
    ids=[i for i, _, _ in BAD_DOWNLOADS],
)
async def test_a_bad_download_is_refused_naming_the_field(
    raw: bool, chunks: list[tensor_pb2.ModelChunk], needle: str
) -> None:
    items: list[Any] = serialized(chunks) if raw else chunks
    with pytest.raises(InvalidArgument, match=r"^model") as excinfo:
        await read_model_download(items_of(items))
    assert needle in str(excinfo.value)


async def test_a_download_is_bounded_from_its_header_and_counted_as_it_arrives() -> None:
    chunks = list(model_stream(TENSORS, chunk_size=MIB))
    with pytest.raises(InvalidArgument, match=r"model\.header\.tensors: .* more than the 1048576"):
        await read_model_download(items_of(chunks), max_bytes=MIB)
    # A stream that goes on past what its header promised is refused at the first byte too
    # many: what follows is read at most `_READ_AHEAD` chunks ahead, then never again.
    read: list[int] = []

    async def endless() -> AsyncIterator[tensor_pb2.ModelChunk]:
        for i, c in enumerate(itertools.chain(chunks, itertools.repeat(chunks[1]))):
            read.append(i)
            yield c

    with pytest.raises(InvalidArgument, match="more tensor bytes than the header's"):
        await read_model_download(endless())
    assert len(chunks) + 1 <= len(read) <= len(chunks) + 1 + _READ_AHEAD
    stopped_at = len(read)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(read) == stopped_at


def _read_ahead_tasks(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() - before if "_pump" in repr(t.get_coro())]


async def test_a_download_given_up_leaves_no_reader_behind() -> None:
    """The task that reads a download's chunks ahead and the thread that hashes them end with
    it: cancelled with the download, and after a failure of the stream, which the download
    raises."""
    before = asyncio.all_tasks()

    async def stalls() -> AsyncIterator[tensor_pb2.ModelChunk]:
        for c in list(model_stream(TENSORS, chunk_size=MIB))[:4]:
            yield c
        await asyncio.Event().wait()  # a registry that stops sending

    async def readers() -> list[asyncio.Task[Any]]:
        return _read_ahead_tasks(before)

    async def hashers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "hash-model" and t.is_alive()]

    task = asyncio.ensure_future(read_model_download(stalls()))
    await eventually(readers, what="the download's reader started")
    await eventually(hashers, what="the download's hashing thread started")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not [t for t in _read_ahead_tasks(before) if not t.done()]
    await eventually(hashers, lambda alive: not alive, what="the hashing thread gone")

    async def breaks() -> AsyncIterator[tensor_pb2.ModelChunk]:
        for c in list(model_stream(TENSORS, chunk_size=MIB))[:4]:
            yield c
        raise ConnectionResetError("the registry went away")

    with pytest.raises(ConnectionResetError, match="the registry went away"):
        await read_model_download(breaks())
    assert not [t for t in _read_ahead_tasks(before) if not t.done()]


async def test_a_downloads_buffer_is_used_again_only_once_nothing_holds_it() -> None:
    """A download of the same size as the previous one writes into that one's buffer when no
    array over it is left (`_SpareBuffer`), never while one is: the arrays a caller keeps
    stay as they arrived."""
    first = {"w": np.arange(1 << 18, dtype="<f8")}
    second = {"w": -np.arange(1 << 18, dtype="<f8")}

    async def download(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chunks = list(model_stream(tensors, chunk_size=MIB, blake3=blake3_of(tensors)))
        _, got = await read_model_download(items_of(serialized(chunks)))
        return got

    kept = await download(first)
    address = kept["w"].ctypes.data
    other = await download(second)  # `kept` is held: a buffer of its own
    assert other["w"].ctypes.data != address
    np.testing.assert_array_equal(kept["w"], first["w"])
    np.testing.assert_array_equal(other["w"], second["w"])
    address = other["w"].ctypes.data
    del other  # nothing holds it now: the next download of its size writes into it
    again = await download(first)
    assert again["w"].ctypes.data == address
    np.testing.assert_array_equal(again["w"], first["w"])
    np.testing.assert_array_equal(kept["w"], first["w"])
    view = again["w"][10:20]  # a view of an array holds the buffer too
    del again
    assert (await download(second))["w"].ctypes.data != address
    np.testing.assert_array_equal(view, first["w"][10:20])
