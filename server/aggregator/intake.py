"""Reading an Aggregate request stream and folding each update in as soon as it is complete.

The stream is: one AggregateHeader, then for each update an UpdateHeader followed by exactly
its total_bytes of data chunks. Only one update's bytes are held at a time; once complete they
are folded into the running FedAvg and dropped. Each update is bounded from its header (the
first one by `MAX_PAYLOAD_BYTES`, every later one by the first one's tensors) and counted as
it arrives; while it arrives, all but its first `SPOOL_ABOVE` bytes wait in a spool file.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable

from propeller.v1 import aggregator_pb2, tensor_pb2
from server.aggregator.fedavg import FedAvg, check_num_samples, check_specs
from server.errors import InvalidArgument
from server.ids import check_id
from server.streams import SPOOL_ABOVE, PayloadBuffer, checked_total
from server.tensors import Spec, offload_if_big, specs_from_proto

log = logging.getLogger(__name__)

SUPPORTED_STRATEGIES = (aggregator_pb2.STRATEGY_UNSPECIFIED, aggregator_pb2.STRATEGY_FEDAVG)


class _PendingUpdate:
    """One update: its header fields and its bytes as they arrive."""

    def __init__(
        self, index: int, header: tensor_pb2.UpdateHeader, specs: list[Spec], need: int
    ) -> None:
        self.index = index
        self.num_samples = int(header.num_samples)
        self.proplet_id = header.proplet_id
        self.specs = specs
        self.data = PayloadBuffer(need, f"updates[{index}].data", spool_above=SPOOL_ABOVE)


def _start_update(
    index: int,
    header: tensor_pb2.UpdateHeader,
    round_id: str,
    fedavg: FedAvg,
) -> _PendingUpdate:
    field = f"updates[{index}]"
    check_id(header.round_id, f"{field}.round_id", optional=True)
    check_id(header.proplet_id, f"{field}.proplet_id", optional=True)
    if round_id and header.round_id and header.round_id != round_id:
        raise InvalidArgument(
            f"{field}.round_id: {header.round_id!r}, the aggregation is for {round_id!r}"
        )
    # Reject before any bytes arrive, not after megabytes were received.
    check_num_samples(index, header.num_samples)
    specs = specs_from_proto(header.tensors, f"{field}.tensors")
    check_specs(index, specs, fedavg.specs)
    return _PendingUpdate(index, header, specs, checked_total(specs, header.total_bytes, field))


async def _fold(fedavg: FedAvg, update: _PendingUpdate) -> None:
    # The arrays are views onto the received bytes (no copy), dropped once folded in.
    tensors = await update.data.done(update.specs)
    await offload_if_big(update.data.need, fedavg.add, tensors, update.num_samples)
    log.debug(
        "[Aggregator.Aggregate] folded update=%d proplet_id=%s num_samples=%d",
        update.index,
        update.proplet_id,
        update.num_samples,
    )


async def fold_update_stream(
    chunks: AsyncIterable[aggregator_pb2.AggregateChunk],
) -> tuple[aggregator_pb2.AggregateHeader, FedAvg]:
    """Read the whole request stream; return its header and the FedAvg of all its updates."""
    header: aggregator_pb2.AggregateHeader | None = None
    fedavg = FedAvg()
    pending: _PendingUpdate | None = None
    started = 0
    try:
        async for chunk in chunks:
            kind = chunk.WhichOneof("part")
            if kind == "header":
                if header is not None:
                    raise InvalidArgument("header: a second AggregateHeader in one stream")
                header = chunk.header
                check_id(header.round_id, "header.round_id", optional=True)
                if header.strategy not in SUPPORTED_STRATEGIES:
                    raise InvalidArgument(
                        f"header.strategy: unsupported strategy {header.strategy} "
                        "(want STRATEGY_FEDAVG)"
                    )
            elif header is None:
                raise InvalidArgument("header: the stream must start with an AggregateHeader")
            elif kind == "update":
                if pending is not None:
                    raise InvalidArgument(
                        f"updates[{pending.index}].data: {pending.data.filled} of "
                        f"{pending.data.need} tensor bytes arrived before the next update header"
                    )
                pending = _start_update(started, chunk.update, header.round_id, fedavg)
                started += 1
                if pending.data.complete:  # an update of empty tensors carries no data chunks
                    await _fold(fedavg, pending)
                    pending = None
            elif kind == "data":
                if pending is None:
                    raise InvalidArgument(
                        f"updates[{started}]: data chunk without an UpdateHeader before it"
                    )
                await pending.data.add(chunk.data)
                if pending.data.complete:
                    await _fold(fedavg, pending)
                    pending = None
            else:
                raise InvalidArgument("part: empty chunk (neither header, update nor data)")
    except BaseException:
        if pending is not None:
            pending.data.close()  # its spool file, if any
        raise
    if header is None:
        raise InvalidArgument("header: stream ended without an AggregateHeader")
    if pending is not None:
        raise InvalidArgument(
            f"updates[{pending.index}].data: stream ended after {pending.data.filled} of "
            f"{pending.data.need} tensor bytes"
        )
    if fedavg.count == 0:
        raise InvalidArgument("updates: no updates to aggregate")
    return header, fedavg
