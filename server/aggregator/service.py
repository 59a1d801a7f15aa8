"""Aggregator servicer: reads the update stream, folds updates in, streams the model back."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from propeller.v1 import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from server.aggregator.fedavg import FedAvg
from server.aggregator.intake import fold_update_stream
from server.errors import InvalidArgument, grpc_errors
from server.grpc_server import Context, ServiceBinding
from server.streams import drain, model_stream
from server.tensors import DEFAULT_CHUNK_SIZE, Tensors, offload_if_big, sha256_of

log = logging.getLogger(__name__)

SERVICE_NAME = "propeller.v1.Aggregator"


def _finish(fedavg: FedAvg) -> tuple[Tensors, str]:
    """The aggregated model and its sha256 (both CPU work on the whole model)."""
    tensors = fedavg.result()
    return tensors, sha256_of(tensors)


def _model_bytes(fedavg: FedAvg) -> int:
    return sum(s.nbytes for s in fedavg.specs or ())


class AggregatorServicer:
    async def Aggregate(
        self, request_iterator: AsyncIterator[aggregator_pb2.AggregateChunk], context: Context
    ) -> AsyncIterator[tensor_pb2.ModelChunk]:
        async with grpc_errors(context, "Aggregator.Aggregate"):
            try:
                header, fedavg = await fold_update_stream(request_iterator)
            except InvalidArgument:
                await drain(request_iterator)
                raise
            result, digest = await offload_if_big(_model_bytes(fedavg), _finish, fedavg)
            log.info(
                "[Aggregator.Aggregate] round_id=%s updates=%d total_samples=%d",
                header.round_id,
                fedavg.count,
                fedavg.total_samples,
            )
            del fedavg
            for chunk in model_stream(result, DEFAULT_CHUNK_SIZE, sha256=digest):
                yield chunk


def binding() -> ServiceBinding:
    return ServiceBinding(
        SERVICE_NAME, AggregatorServicer(), aggregator_pb2_grpc.add_AggregatorServicer_to_server
    )
