"""Reading an Aggregate request stream and handing each update to the round's strategy as
soon as it is complete.

The stream is: one AggregateHeader (the strategy by name and its parameters); then, in this
order and each at most once, `base` (the model the round started from) and `state` (the
strategy's state from the previous round), each a ModelHeader followed by exactly its bytes;
then for each update an UpdateHeader followed by exactly its total_bytes of data chunks.

Only one part's bytes arrive at a time. Each is bounded from its header before any of its
bytes: the base and the first update by `MAX_PAYLOAD_BYTES`, the state by the specs the
strategy's state must have for the base's tensors, every update by the first one's (or the
base's) tensors; while a part arrives, all but its first `SPOOL_ABOVE` bytes wait in a spool
file. An incremental strategy (the FedAvg family) folds each update in and drops it; an
order-statistic strategy holds them, at most `max_held_bytes` in all (an update that would
go beyond is refused from its header: RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass

from propeller.v1 import aggregator_pb2, tensor_pb2
from server.aggregator.fedavg import all_finite, check_num_samples, check_specs
from server.aggregator.strategies import Strategy, choose_strategy
from server.aggregator.strategies.base import STATE_DTYPE
from server.errors import InvalidArgument, ResourceExhausted
from server.ids import check_id
from server.streams import SPOOL_ABOVE, PayloadBuffer, checked_total
from server.tensors import Spec, Tensors, offload_if_big, specs_from_proto, total_bytes

log = logging.getLogger(__name__)

SUPPORTED_STRATEGIES = (aggregator_pb2.STRATEGY_UNSPECIFIED, aggregator_pb2.STRATEGY_FEDAVG)
# What an order-statistic strategy may hold of one round's updates unless configured
# otherwise (`PROPELLER_AGGREGATOR_MAX_HELD_BYTES`).
DEFAULT_MAX_HELD_BYTES = 1 << 30


@dataclass
class AggregateInput:
    """A request stream read to its end: the header, the strategy holding (or having folded)
    every update, and the base model and state when they were sent."""

    header: aggregator_pb2.AggregateHeader
    strategy: Strategy
    base: Tensors | None
    state: Tensors | None


class _PendingPart:
    """One part of the stream (the base, the state or an update) as its bytes arrive."""

    def __init__(self, field: str, specs: list[Spec], need: int) -> None:
        self.field = field
        self.specs = specs
        self.data = PayloadBuffer(need, f"{field}.data", spool_above=SPOOL_ABOVE)


class _PendingUpdate(_PendingPart):
    def __init__(
        self, index: int, header: tensor_pb2.UpdateHeader, specs: list[Spec], need: int
    ) -> None:
        super().__init__(f"updates[{index}]", specs, need)
        self.index = index
        self.num_samples = int(header.num_samples)
        self.proplet_id = header.proplet_id


def _check_against_base(field: str, specs: Sequence[Spec], base: Sequence[Spec]) -> None:
    """The base's tensors must be the updates' (names in order, shapes); its float dtype may
    differ (the arithmetic is float64)."""
    names, base_names = [s.name for s in specs], [s.name for s in base]
    if names != base_names:
        raise InvalidArgument(f"base.tensors: names {base_names} differ from {field}'s {names}")
    for spec, ref in zip(specs, base, strict=True):
        if spec.shape != ref.shape:
            raise InvalidArgument(
                f"base.tensors.{ref.name}.shape: {list(ref.shape)}, {field} has {list(spec.shape)}"
            )


@dataclass
class _Intake:
    max_held_bytes: int
    header: aggregator_pb2.AggregateHeader | None = None
    strategy: Strategy | None = None
    base_specs: list[Spec] | None = None
    base: Tensors | None = None
    state: Tensors | None = None
    started: int = 0
    held_bytes: int = 0

    def on_header(self, header: aggregator_pb2.AggregateHeader) -> None:
        if self.header is not None:
            raise InvalidArgument("header: a second AggregateHeader in one stream")
        check_id(header.round_id, "header.round_id", optional=True)
        if header.strategy not in SUPPORTED_STRATEGIES:
            raise InvalidArgument(
                f"header.strategy: unsupported strategy {header.strategy} (want STRATEGY_FEDAVG)"
            )
        choice = choose_strategy(
            header.strategy_name, header.strategy_params_json, "header.strategy_name"
        )
        self.header = header
        self.strategy = choice.start()

    def start_base(self, header: tensor_pb2.ModelHeader) -> _PendingPart:
        if self.base_specs is not None:
            raise InvalidArgument("base: sent twice in one stream")
        if self.state is not None or self.started:
            raise InvalidArgument("base: must come before the state and the updates")
        specs = specs_from_proto(header.tensors, "base.tensors")
        if not specs:
            raise InvalidArgument("base.tensors: must list at least one tensor")
        need = checked_total(specs, header.total_bytes, "base")
        self.base_specs = specs
        return _PendingPart("base", specs, need)

    def start_state(self, header: tensor_pb2.ModelHeader) -> _PendingPart:
        strategy = self.require_strategy()
        if not strategy.stateful:
            raise InvalidArgument(f"state: strategy {strategy.name} keeps no state")
        if self.state is not None:
            raise InvalidArgument("state: sent twice in one stream")
        if self.base_specs is None:
            raise InvalidArgument("state: must come after the base")
        if self.started:
            raise InvalidArgument("state: must come before the updates")
        specs = specs_from_proto(header.tensors, "state.tensors")
        expected = strategy.state_specs(self.base_specs)
        if [s.name for s in specs] != [s.name for s in expected]:
            raise InvalidArgument(
                f"state.tensors: names {[s.name for s in specs]}, strategy {strategy.name} "
                f"keeps {[s.name for s in expected]} for this model"
            )
        for spec, want in zip(specs, expected, strict=True):
            if spec.shape != want.shape or spec.dtype != STATE_DTYPE:
                raise InvalidArgument(
                    f"state.tensors.{spec.name}: {spec.dtype} {list(spec.shape)}, want "
                    f"{STATE_DTYPE} {list(want.shape)}"
                )
        # Bounded by what the state must be for this base, not by what the header claims.
        need = checked_total(specs, header.total_bytes, "state", max_bytes=total_bytes(expected))
        return _PendingPart("state", specs, need)

    def start_update(self, header: tensor_pb2.UpdateHeader) -> _PendingUpdate:
        strategy = self.require_strategy()
        if strategy.needs_base and self.base_specs is None:
            # Said before any update's bytes arrive: the base comes first or not at all.
            raise InvalidArgument(f"base: strategy {strategy.name} needs the round's base model")
        index = self.started
        field = f"updates[{index}]"
        round_id = self.require_header().round_id
        check_id(header.round_id, f"{field}.round_id", optional=True)
        check_id(header.proplet_id, f"{field}.proplet_id", optional=True)
        if round_id and header.round_id and header.round_id != round_id:
            raise InvalidArgument(
                f"{field}.round_id: {header.round_id!r}, the aggregation is for {round_id!r}"
            )
        # Reject before any bytes arrive, not after megabytes were received.
        check_num_samples(index, header.num_samples)
        specs = specs_from_proto(header.tensors, f"{field}.tensors")
        check_specs(index, specs, strategy.specs)
        if strategy.specs is None and self.base_specs is not None:
            _check_against_base(field, specs, self.base_specs)
        need = checked_total(specs, header.total_bytes, field)
        if not strategy.incremental:
            if self.held_bytes + need > self.max_held_bytes:
                raise ResourceExhausted(
                    f"{field}: strategy {strategy.name} holds every update of the round; "
                    f"{self.held_bytes} bytes held and {need} more would exceed this "
                    f"aggregator's limit of {self.max_held_bytes} "
                    "(PROPELLER_AGGREGATOR_MAX_HELD_BYTES)"
                )
            self.held_bytes += need
        self.started += 1
        return _PendingUpdate(index, header, specs, need)

    async def finish(self, part: _PendingPart) -> None:
        # The arrays are views onto the received bytes (no copy).
        tensors = await part.data.done(part.specs)
        if isinstance(part, _PendingUpdate):
            strategy = self.require_strategy()
            await offload_if_big(part.data.need, strategy.add, tensors, part.num_samples)
            log.debug(
                "[Aggregator.Aggregate] took update=%d proplet_id=%s num_samples=%d",
                part.index,
                part.proplet_id,
                part.num_samples,
            )
            return
        for name, arr in tensors.items():
            if not all_finite(arr.reshape(-1)):
                raise InvalidArgument(f"{part.field}.tensors.{name}: contains NaN or Inf")
        if part.field == "base":
            self.base = tensors
        else:
            self.state = tensors

    def require_header(self) -> aggregator_pb2.AggregateHeader:
        if self.header is None:
            raise InvalidArgument("header: the stream must start with an AggregateHeader")
        return self.header

    def require_strategy(self) -> Strategy:
        self.require_header()
        assert self.strategy is not None
        return self.strategy


async def read_aggregate_stream(
    chunks: AsyncIterable[aggregator_pb2.AggregateChunk],
    *,
    max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
) -> AggregateInput:
    """Read the whole request stream; every update is in the strategy when it returns."""
    intake = _Intake(max_held_bytes)
    pending: _PendingPart | None = None
    try:
        async for chunk in chunks:
            kind = chunk.WhichOneof("part")
            if kind == "header":
                intake.on_header(chunk.header)
                continue
            intake.require_header()
            if kind == "data":
                if pending is None:
                    raise InvalidArgument(
                        f"updates[{intake.started}]: data chunk without an UpdateHeader before it"
                    )
                await pending.data.add(chunk.data)
            elif kind in ("update", "base", "state"):
                if pending is not None:
                    raise InvalidArgument(
                        f"{pending.field}.data: {pending.data.filled} of {pending.data.need} "
                        f"tensor bytes arrived before the next {kind} header"
                    )
                if kind == "update":
                    pending = intake.start_update(chunk.update)
                elif kind == "base":
                    pending = intake.start_base(chunk.base)
                else:
                    pending = intake.start_state(chunk.state)
            else:
                raise InvalidArgument(
                    "part: empty chunk (neither header, base, state, update nor data)"
                )
            # A part of empty tensors carries no data chunks.
            if pending is not None and pending.data.complete:
                part, pending = pending, None
                await intake.finish(part)
    except BaseException:
        if pending is not None:
            pending.data.close()  # its spool file, if any
        raise
    header = intake.require_header()
    if pending is not None:
        raise InvalidArgument(
            f"{pending.field}.data: stream ended after {pending.data.filled} of "
            f"{pending.data.need} tensor bytes"
        )
    strategy = intake.require_strategy()
    if strategy.count == 0:
        raise InvalidArgument("updates: no updates to aggregate")
    if strategy.needs_base and intake.base is None:
        raise InvalidArgument(f"base: strategy {strategy.name} needs the round's base model")
    return AggregateInput(header, strategy, intake.base, intake.state)
