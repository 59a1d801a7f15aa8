"""Calling the Aggregator: stream updates in, read the aggregated model back.

The call is driven with explicit writes rather than a request iterator, so an error raised
while producing the updates (a caller's bug, a bad array) surfaces as itself instead of as a
silently cancelled RPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import grpc

from propeller.v1 import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from server.errors import InvalidArgument, Unavailable, from_rpc_error
from server.streams import UpdateMeta, read_model_stream, update_header
from server.tensors import DEFAULT_CHUNK_SIZE, Array, Tensors, iter_chunks, sha256_of, specs_of

log = logging.getLogger(__name__)

METHOD = "Aggregator.Aggregate"

UpdateInput = tuple[UpdateMeta | tensor_pb2.UpdateHeader, Mapping[str, Array]]


def _update_header(
    meta: UpdateMeta | tensor_pb2.UpdateHeader, tensors: Mapping[str, Array], round_id: str
) -> tensor_pb2.UpdateHeader:
    """The wire header of one update; tensor specs and total_bytes always come from the
    arrays actually sent, so they cannot disagree with the data."""
    specs = specs_of(tensors)
    if isinstance(meta, UpdateMeta):
        header = update_header(meta, specs)
    else:
        header = tensor_pb2.UpdateHeader()
        header.CopyFrom(meta)
        fresh = update_header(
            UpdateMeta(header.round_id, header.proplet_id, header.base_model_uri, 0, {}), specs
        )
        del header.tensors[:]
        header.tensors.extend(fresh.tensors)
        header.total_bytes = fresh.total_bytes
    if not header.round_id:
        header.round_id = round_id
    return header


def aggregate_requests(
    updates: Iterable[UpdateInput],
    round_id: str,
    strategy: aggregator_pb2.Strategy = aggregator_pb2.STRATEGY_FEDAVG,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[aggregator_pb2.AggregateChunk]:
    """The request stream of one Aggregate call, produced lazily update by update."""
    yield aggregator_pb2.AggregateChunk(
        header=aggregator_pb2.AggregateHeader(strategy=strategy, round_id=round_id)
    )
    for meta, tensors in updates:
        yield aggregator_pb2.AggregateChunk(update=_update_header(meta, tensors, round_id))
        for data in iter_chunks(tensors, chunk_size):
            yield aggregator_pb2.AggregateChunk(data=data)


async def _responses(call: Any) -> AsyncIterator[tensor_pb2.ModelChunk]:
    async for chunk in call:
        yield chunk


async def aggregate_via(
    stub_or_channel: Any,
    updates: Iterable[UpdateInput],
    round_id: str,
    timeout: float,
    *,
    strategy: aggregator_pb2.Strategy = aggregator_pb2.STRATEGY_FEDAVG,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensors:
    """Aggregate `updates` ((UpdateMeta or UpdateHeader, tensors) pairs) on the Aggregator
    reached through `stub_or_channel` (an AggregatorStub or a grpc.aio.Channel).

    Updates are streamed one at a time, so `updates` may be a lazy iterable. Raises the
    project's errors: InvalidArgument (naming `updates[i].<field>`) for a rejected update,
    Unavailable / DeadlineExceeded when the aggregator cannot be reached in time.
    """
    stub = (
        aggregator_pb2_grpc.AggregatorStub(stub_or_channel)
        if isinstance(stub_or_channel, grpc.aio.Channel)
        else stub_or_channel
    )
    call = stub.Aggregate(timeout=timeout)
    try:
        try:
            for request in aggregate_requests(updates, round_id, strategy, chunk_size):
                await call.write(request)
            await call.done_writing()
        except asyncio.InvalidStateError:
            # The aggregator ended the call early (it rejected an update); its status,
            # read below, says why.
            pass
        try:
            header, tensors = await read_model_stream(_responses(call), "aggregate.response")
        except InvalidArgument as exc:
            # A malformed response is the aggregator's fault, not the caller's arguments'.
            raise Unavailable(f"{METHOD}: malformed response: {exc}") from None
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, METHOD) from None
    finally:
        call.cancel()  # a no-op once the call has finished
    digest = await asyncio.to_thread(sha256_of, tensors)
    if header.sha256 and header.sha256 != digest:
        raise Unavailable(
            f"{METHOD}: response sha256 {header.sha256} does not match its bytes ({digest})"
        )
    return tensors
