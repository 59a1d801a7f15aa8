"""The one assembler of inbound tensor bytes (`server.streams`): counted as they arrive,
spooled to a temporary file above a threshold, read back piece by piece or whole; and the
bounded draining of a rejected stream."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import numpy as np
import pytest

from propeller.v1 import tensor_pb2
from server.errors import InvalidArgument
from server.streams import (
    Payload,
    PayloadBuffer,
    checked_total,
    drain,
    model_stream,
    read_model_payload,
    read_model_stream,
)
from server.tensors import Spec, specs_of, tensor_bytes

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
