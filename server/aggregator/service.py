"""Aggregator servicer: reads the request stream into the round's strategy, streams the model
back, then (for a strategy that keeps state) the new state, then each update's weight as
aggregated (what the version's lineage records)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import numpy as np

from propeller.v1 import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from server.aggregator.client import WEIGHTS_TENSOR, WEIGHTS_URI
from server.aggregator.intake import (
    DEFAULT_MAX_HELD_BYTES,
    AggregateInput,
    read_aggregate_stream,
)
from server.errors import InvalidArgument, ResourceExhausted, grpc_errors
from server.grpc_server import Context, ServiceBinding
from server.streams import drain, model_stream
from server.tensors import DEFAULT_CHUNK_SIZE, Tensors, offload_if_big, sha256_of

log = logging.getLogger(__name__)

SERVICE_NAME = "propeller.v1.Aggregator"
# The second answer's model_uri: the strategy's new state, to be sent back next round.
STATE_URI = "state"


def _finish(request: AggregateInput) -> tuple[Tensors, str, Tensors | None, str, Tensors]:
    """The new model and state and their sha256s (all CPU work on the whole model), and the
    updates' weights."""
    model, state = request.strategy.result(request.base, request.state)
    weights: Tensors = {WEIGHTS_TENSOR: np.asarray(request.strategy.weights(), np.float64)}
    return model, sha256_of(model), state, "" if state is None else sha256_of(state), weights


def _work_bytes(request: AggregateInput) -> int:
    specs = request.strategy.specs or ()
    held = 1 if request.strategy.incremental else request.strategy.count
    return sum(s.nbytes for s in specs) * held


class AggregatorServicer:
    def __init__(self, max_held_bytes: int = DEFAULT_MAX_HELD_BYTES) -> None:
        self._max_held_bytes = max_held_bytes

    async def Aggregate(
        self, request_iterator: AsyncIterator[aggregator_pb2.AggregateChunk], context: Context
    ) -> AsyncIterator[tensor_pb2.ModelChunk]:
        async with grpc_errors(context, "Aggregator.Aggregate"):
            try:
                request = await read_aggregate_stream(
                    request_iterator, max_held_bytes=self._max_held_bytes
                )
            except (InvalidArgument, ResourceExhausted):
                await drain(request_iterator)
                raise
            await request.strategy.prepare(request.base, request.state)
            model, digest, state, state_digest, weights = await offload_if_big(
                _work_bytes(request), _finish, request
            )
            log.info(
                "[Aggregator.Aggregate] round_id=%s strategy=%s updates=%d total_samples=%d",
                request.header.round_id,
                request.strategy.name,
                request.strategy.count,
                request.strategy.total_samples,
            )
            del request
            for chunk in model_stream(model, DEFAULT_CHUNK_SIZE, sha256=digest):
                yield chunk
            if state is not None:
                for chunk in model_stream(
                    state, DEFAULT_CHUNK_SIZE, model_uri=STATE_URI, sha256=state_digest
                ):
                    yield chunk
            for chunk in model_stream(weights, DEFAULT_CHUNK_SIZE, model_uri=WEIGHTS_URI):
                yield chunk


def binding(max_held_bytes: int = DEFAULT_MAX_HELD_BYTES) -> ServiceBinding:
    return ServiceBinding(
        SERVICE_NAME,
        AggregatorServicer(max_held_bytes),
        aggregator_pb2_grpc.add_AggregatorServicer_to_server,
    )
