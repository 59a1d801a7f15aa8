"""The one client of the Aggregator: stream updates in, read the aggregated model back.

The coordinator aggregates through it (`server.coordinator.clients`), and so do the tests.
The call is driven with explicit writes rather than a request iterator, so an error raised
while producing the updates (a caller's bug, a bad array) surfaces as itself instead of as a
silently cancelled RPC. Updates come from an async iterable and are sent one at a time, so
each may be read just before it is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import grpc

from propeller.v1 import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from server.errors import InvalidArgument, Unavailable, rpc_errors
from server.streams import UpdateMeta, read_model_stream, update_header
from server.tensors import (
    DEFAULT_CHUNK_SIZE,
    Array,
    Tensors,
    iter_chunks,
    nbytes_of,
    offload_if_big,
    sha256_of,
    specs_of,
)

METHOD = "Aggregator.Aggregate"

UpdateInput = tuple[UpdateMeta, Mapping[str, Array]]


def update_requests(
    meta: UpdateMeta, tensors: Mapping[str, Array], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[aggregator_pb2.AggregateChunk]:
    """One update's part of an Aggregate request stream: its header (specs and total_bytes
    taken from the arrays sent, so they cannot disagree with the data), then its bytes."""
    yield aggregator_pb2.AggregateChunk(update=update_header(meta, specs_of(tensors)))
    for data in iter_chunks(tensors, chunk_size):
        yield aggregator_pb2.AggregateChunk(data=data)


def stream_header(
    round_id: str, strategy: aggregator_pb2.Strategy = aggregator_pb2.STRATEGY_FEDAVG
) -> aggregator_pb2.AggregateChunk:
    return aggregator_pb2.AggregateChunk(
        header=aggregator_pb2.AggregateHeader(strategy=strategy, round_id=round_id)
    )


def aggregate_requests(
    updates: Iterable[UpdateInput],
    round_id: str,
    strategy: aggregator_pb2.Strategy = aggregator_pb2.STRATEGY_FEDAVG,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[aggregator_pb2.AggregateChunk]:
    """The whole request stream of one Aggregate call, produced lazily update by update."""
    yield stream_header(round_id, strategy)
    for meta, tensors in updates:
        yield from update_requests(meta, tensors, chunk_size)


class AggregatorClient:
    """Aggregate calls over `channel` (owned by the caller), each with a timeout. Failures
    come back as the project's errors: InvalidArgument (naming `updates[i].<field>`) for a
    rejected update, Unavailable / DeadlineExceeded when the aggregator cannot be reached in
    time or answers with something malformed."""

    def __init__(
        self, channel: grpc.aio.Channel, *, timeout_s: float, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        self._stub = aggregator_pb2_grpc.AggregatorStub(channel)
        self._timeout_s = timeout_s
        self._chunk_size = chunk_size

    async def aggregate(
        self,
        round_id: str,
        updates: AsyncIterable[UpdateInput],
        *,
        strategy: aggregator_pb2.Strategy = aggregator_pb2.STRATEGY_FEDAVG,
    ) -> tuple[Tensors, str]:
        """The aggregate of `updates` ((UpdateMeta, tensors) pairs) and the sha256 of its
        bytes, checked against the one the aggregator sent: verified here, once."""
        call = self._stub.Aggregate(timeout=self._timeout_s)
        try:
            with rpc_errors(METHOD):
                try:
                    await call.write(stream_header(round_id, strategy))
                    async for meta, tensors in updates:
                        for request in update_requests(meta, tensors, self._chunk_size):
                            await call.write(request)
                        del tensors  # not held while the next update is read
                    await call.done_writing()
                except asyncio.InvalidStateError:
                    # The aggregator ended the call early (it rejected an update); its status,
                    # read below, says why.
                    pass
                try:
                    header, result = await read_model_stream(_responses(call), "aggregate.response")
                except InvalidArgument as exc:
                    # A malformed response is the aggregator's fault, not the caller's arguments'.
                    raise Unavailable(f"{METHOD}: malformed response: {exc}") from None
        finally:
            call.cancel()  # a no-op once the call has finished
        digest = await offload_if_big(nbytes_of(result), sha256_of, result)
        if header.sha256 and header.sha256 != digest:
            raise Unavailable(
                f"{METHOD}: response sha256 {header.sha256} does not match its bytes ({digest})"
            )
        return result, digest


async def _responses(call: Any) -> AsyncIterator[tensor_pb2.ModelChunk]:
    async for chunk in call:
        yield chunk
