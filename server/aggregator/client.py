"""The one client of the Aggregator: stream the strategy, the base model, the strategy's state
and the updates in; read the aggregated model (and the new state) back.

The coordinator aggregates through it (`server.coordinator.clients`), and so do the tests.
The call is driven with explicit writes rather than a request iterator, so an error raised
while producing the updates (a caller's bug, a bad array) surfaces as itself instead of as a
silently cancelled RPC. Updates come from an async iterable and are sent one at a time, so
each may be read just before it is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from propeller.v1 import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from server.errors import InvalidArgument, Unavailable, rpc_errors
from server.streams import UpdateMeta, checked_total, model_stream, update_header
from server.tensors import (
    DEFAULT_CHUNK_SIZE,
    Array,
    Tensors,
    digest_of,
    iter_chunks,
    specs_from_proto,
    specs_of,
    split_payload,
)

METHOD = "Aggregator.Aggregate"
# The model_uri of the answer's second model: the strategy's new state.
STATE_URI = "state"
# The model_uri of the answer's last part: one float64 tensor WEIGHTS_TENSOR of shape [K],
# update i's weight in the aggregate (`Strategy.weights`; the lineage records it).
WEIGHTS_URI = "weights"
WEIGHTS_TENSOR = "weight"

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
    round_id: str,
    strategy: aggregator_pb2.Strategy = aggregator_pb2.STRATEGY_FEDAVG,
    *,
    strategy_name: str = "",
    strategy_params_json: str = "",
) -> aggregator_pb2.AggregateChunk:
    return aggregator_pb2.AggregateChunk(
        header=aggregator_pb2.AggregateHeader(
            # A strategy by name leaves the enum unspecified (the name decides).
            strategy=aggregator_pb2.STRATEGY_UNSPECIFIED if strategy_name else strategy,
            round_id=round_id,
            strategy_name=strategy_name,
            strategy_params_json=strategy_params_json,
        )
    )


def model_part_requests(
    part: str, tensors: Mapping[str, Array], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[aggregator_pb2.AggregateChunk]:
    """The `base` or `state` part of a request stream: a ModelHeader, then its bytes."""
    for chunk in model_stream(tensors, chunk_size):
        if chunk.WhichOneof("part") == "header":
            request = aggregator_pb2.AggregateChunk()
            getattr(request, part).CopyFrom(chunk.header)
            yield request
        else:
            yield aggregator_pb2.AggregateChunk(data=chunk.data)


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


@dataclass(frozen=True)
class Aggregated:
    """An Aggregate answer: the model, its sha256 (verified against the bytes), the
    strategy's new state (None for a stateless strategy) and each update's weight in the
    aggregate, in the order sent (None: the aggregator answered none)."""

    model: Tensors
    sha256: str
    state: Tensors | None
    weights: list[float] | None = None


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
        """The FedAvg of `updates` ((UpdateMeta, tensors) pairs) and the sha256 of its bytes,
        checked against the one the aggregator sent: verified here, once."""
        result = await self.aggregate_round(round_id, updates, strategy=strategy)
        return result.model, result.sha256

    async def aggregate_round(
        self,
        round_id: str,
        updates: AsyncIterable[UpdateInput],
        *,
        strategy: aggregator_pb2.Strategy = aggregator_pb2.STRATEGY_FEDAVG,
        strategy_name: str = "",
        strategy_params_json: str = "",
        base: Mapping[str, Array] | None = None,
        state: Mapping[str, Array] | None = None,
    ) -> Aggregated:
        """One round's aggregation by the strategy `strategy_name` (empty: `strategy`) with its
        parameters, from the round's `base` model and the strategy's `state` as the previous
        round answered it (None: the first round)."""
        call = self._stub.Aggregate(timeout=self._timeout_s)
        sent = 0
        try:
            with rpc_errors(METHOD):
                try:
                    await call.write(
                        stream_header(
                            round_id,
                            strategy,
                            strategy_name=strategy_name,
                            strategy_params_json=strategy_params_json,
                        )
                    )
                    for part, tensors in (("base", base), ("state", state)):
                        if tensors is not None:
                            for request in model_part_requests(part, tensors, self._chunk_size):
                                await call.write(request)
                    async for meta, update in updates:
                        for request in update_requests(meta, update, self._chunk_size):
                            await call.write(request)
                        sent += 1
                        del update  # not held while the next update is read
                    await call.done_writing()
                except asyncio.InvalidStateError:
                    # The aggregator ended the call early (it rejected an update); its status,
                    # read below, says why.
                    pass
                try:
                    answers = await read_answer(_responses(call))
                except InvalidArgument as exc:
                    # A malformed response is the aggregator's fault, not the caller's arguments'.
                    raise Unavailable(f"{METHOD}: malformed response: {exc}") from None
        finally:
            call.cancel()  # a no-op once the call has finished
        (header, model), *rest = answers
        digest = await digest_of(model)
        if header.sha256 and header.sha256 != digest:
            raise Unavailable(
                f"{METHOD}: response sha256 {header.sha256} does not match its bytes ({digest})"
            )
        new_state: Tensors | None = None
        weights: list[float] | None = None
        for part_header, tensors in rest:
            if part_header.model_uri == STATE_URI:
                new_state = tensors
                if part_header.sha256 and part_header.sha256 != await digest_of(new_state):
                    raise Unavailable(f"{METHOD}: the state's sha256 does not match its bytes")
            else:
                weights = _weights(tensors)
                if len(weights) != sent:
                    raise Unavailable(f"{METHOD}: {len(weights)} weights for {sent} updates")
        return Aggregated(model, digest, new_state, weights)


def _weights(tensors: Tensors) -> list[float]:
    weight = tensors.get(WEIGHTS_TENSOR)
    if len(tensors) != 1 or weight is None or weight.ndim != 1:
        raise Unavailable(f"{METHOD}: the weights part must be one tensor {WEIGHTS_TENSOR}[K]")
    return [float(x) for x in weight]


# The parts an answer may have after the model, in this order.
_LATER_PARTS = (STATE_URI, WEIGHTS_URI)


async def read_answer(
    stream: AsyncIterable[tensor_pb2.ModelChunk],
) -> list[tuple[tensor_pb2.ModelHeader, Tensors]]:
    """An Aggregate answer: the model (header, then its bytes), then optionally a header with
    model_uri "state" and the state's bytes, then optionally one with model_uri "weights" and
    the updates' weights. Each part is bounded by its header and must be complete before the
    next starts; InvalidArgument for anything else."""
    parts: list[tuple[tensor_pb2.ModelHeader, Tensors]] = []
    header: tensor_pb2.ModelHeader | None = None
    data = bytearray()
    need = 0

    def close_part() -> None:
        if header is None:
            return
        if len(data) != need:
            raise InvalidArgument(f"response: {len(data)} of {need} tensor bytes")
        parts.append((header, split_payload(data, specs_from_proto(header.tensors, ""), "")))

    async for chunk in stream:
        kind = chunk.WhichOneof("part")
        if kind == "header":
            close_part()
            if parts:
                uri = chunk.header.model_uri
                # After the model, each later part at most once, in order.
                last = _LATER_PARTS.index(parts[-1][0].model_uri) if len(parts) > 1 else -1
                allowed = list(_LATER_PARTS[last + 1 :])
                if uri not in allowed:
                    raise InvalidArgument(
                        f"response: header {len(parts) + 1}'s model_uri {uri!r}, want one of "
                        f"{allowed} (a model, then a state, then weights)"
                    )
            header = chunk.header
            field = f"response.{header.model_uri}" if parts else "response.model"
            specs = specs_from_proto(header.tensors, f"{field}.tensors")
            if not specs:
                raise InvalidArgument(f"{field}.tensors: must list at least one tensor")
            need = checked_total(specs, header.total_bytes, field)
            data = bytearray()
        elif kind == "data":
            if header is None:
                raise InvalidArgument("response: data chunk before the header")
            if len(data) + len(chunk.data) > need:
                raise InvalidArgument(f"response: more tensor bytes than the header's {need}")
            data += chunk.data
        else:
            raise InvalidArgument("response: empty chunk (neither header nor data)")
    if header is None:
        raise InvalidArgument("response: stream ended without a header")
    close_part()
    return parts


async def _responses(call: Any) -> AsyncIterator[tensor_pb2.ModelChunk]:
    async for chunk in call:
        yield chunk
