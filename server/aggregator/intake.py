"""Reading an Aggregate request stream and folding each update in as soon as it is complete.

The stream is: one AggregateHeader, then for each update an UpdateHeader followed by exactly
its total_bytes of data chunks. Only one update's bytes are held at a time; once complete they
are folded into the running FedAvg and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable

import numpy as np

from propeller.v1 import aggregator_pb2, tensor_pb2
from server.aggregator.fedavg import FedAvg, check_num_samples, check_specs
from server.errors import InvalidArgument
from server.streams import MAX_PAYLOAD_BYTES
from server.tensors import Spec, Tensors, specs_from_proto, total_bytes

log = logging.getLogger(__name__)

SUPPORTED_STRATEGIES = (aggregator_pb2.STRATEGY_UNSPECIFIED, aggregator_pb2.STRATEGY_FEDAVG)
# Updates of at most this many bytes are folded in on the event loop, bigger ones in a thread.
INLINE_BYTES = 256 << 10


class _PendingUpdate:
    """The bytes of one update as they arrive. The buffer grows with the data actually
    received, never to what a header merely claims (a few bytes of header must not make the
    server allocate gigabytes)."""

    def __init__(self, index: int, header: tensor_pb2.UpdateHeader, specs: list[Spec]) -> None:
        self.index = index
        self.num_samples = int(header.num_samples)
        self.proplet_id = header.proplet_id
        self.specs = specs
        self.need = total_bytes(specs)
        self.buf = bytearray()

    @property
    def filled(self) -> int:
        return len(self.buf)

    @property
    def complete(self) -> bool:
        return self.filled == self.need

    def add(self, data: bytes) -> None:
        if self.filled + len(data) > self.need:
            raise InvalidArgument(
                f"updates[{self.index}].data: more tensor bytes than its total_bytes {self.need}"
            )
        self.buf += data

    def tensors(self) -> Tensors:
        """Views onto the received bytes (no copy); valid while this object lives."""
        out: Tensors = {}
        offset = 0
        for spec in self.specs:
            count = spec.nbytes // spec.dtype.itemsize
            arr = np.frombuffer(self.buf, dtype=spec.dtype, count=count, offset=offset)
            out[spec.name] = arr.reshape(spec.shape)
            offset += spec.nbytes
        return out


def _start_update(
    index: int,
    header: tensor_pb2.UpdateHeader,
    round_id: str,
    fedavg: FedAvg,
) -> _PendingUpdate:
    field = f"updates[{index}]"
    if round_id and header.round_id and header.round_id != round_id:
        raise InvalidArgument(
            f"{field}.round_id: {header.round_id!r}, the aggregation is for {round_id!r}"
        )
    # Reject before any bytes arrive, not after megabytes were received.
    check_num_samples(index, header.num_samples)
    specs = specs_from_proto(header.tensors, f"{field}.tensors")
    check_specs(index, specs, fedavg.specs)
    need = total_bytes(specs)
    if header.total_bytes not in (0, need):
        raise InvalidArgument(f"{field}.total_bytes: {header.total_bytes}, its tensors need {need}")
    if need > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(f"{field}.tensors: {need} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return _PendingUpdate(index, header, specs)


async def _fold(fedavg: FedAvg, update: _PendingUpdate) -> None:
    if update.need <= INLINE_BYTES:  # less work than handing it to a thread and back
        fedavg.add(update.tensors(), update.num_samples)
    else:
        await asyncio.to_thread(fedavg.add, update.tensors(), update.num_samples)
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
    async for chunk in chunks:
        kind = chunk.WhichOneof("part")
        if kind == "header":
            if header is not None:
                raise InvalidArgument("header: a second AggregateHeader in one stream")
            header = chunk.header
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
                    f"updates[{pending.index}].data: {pending.filled} of {pending.need} tensor "
                    "bytes arrived before the next update header"
                )
            pending = _start_update(started, chunk.update, header.round_id, fedavg)
            started += 1
            if pending.complete:  # an update of empty tensors carries no data chunks
                await _fold(fedavg, pending)
                pending = None
        elif kind == "data":
            if pending is None:
                raise InvalidArgument(
                    f"updates[{started}]: data chunk without an UpdateHeader before it"
                )
            pending.add(chunk.data)
            if pending.complete:
                await _fold(fedavg, pending)
                pending = None
        else:
            raise InvalidArgument("part: empty chunk (neither header, update nor data)")
    if header is None:
        raise InvalidArgument("header: stream ended without an AggregateHeader")
    if pending is not None:
        raise InvalidArgument(
            f"updates[{pending.index}].data: stream ended after {pending.filled} of "
            f"{pending.need} tensor bytes"
        )
    if fedavg.count == 0:
        raise InvalidArgument("updates: no updates to aggregate")
    return header, fedavg
