"""The manager's view of the Coordinator: the round calls it makes, in domain types
(`RoundSpec` in, the coordinator's `Round` out), behind a Protocol so the orchestration can be
exercised without a network. `CoordinatorClient` is the gRPC edge."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from propeller.v1 import coordinator_pb2
from server.coordinator.rounds import Round, RoundState
from server.coordinator.wire import STATE_OF, spec_fields, status_from_proto
from server.errors import rpc_errors
from server.round_spec import RoundSpec


class RoundService(Protocol):
    async def configure_round(
        self, spec: RoundSpec, *, strategy_name: str = "", strategy_params_json: str = ""
    ) -> Round:
        """Configure (not start) the round `spec` describes, aggregated by the strategy named
        ("" = fedavg); zeros are the coordinator's to fill."""
        ...

    def watch_round(self, round_id: str, timeout_s: float) -> AsyncGenerator[Round, None]:
        """The round as it is, then after each change of its state (an accepted update is
        not one), until it is finished or `timeout_s` passed (DEADLINE_EXCEEDED)."""
        ...

    async def start_round(self, round_id: str) -> Round: ...

    async def get_round_status(self, round_id: str) -> Round: ...

    async def report_failure(self, round_id: str, proplet_id: str, reason: str) -> RoundState:
        """`proplet_id` cannot report in `round_id` (its task failed or was stopped); the
        round's state after it. Only the state: a burst of failures reported in a big round
        must not cost O(participants) each (the coordinator answers without the round's
        lists, `brief`)."""
        ...


class CoordinatorClient:
    """`RoundService` over a `CoordinatorStub`; failures keep their status code
    (ALREADY_EXISTS stays ALREADY_EXISTS) through `rpc_errors`."""

    def __init__(self, stub: Any, timeout_s: float) -> None:
        self._stub = stub
        self.timeout_s = timeout_s

    async def _call(self, method: str, request: Any) -> Round:
        with rpc_errors(f"Coordinator.{method}"):
            status = await getattr(self._stub, method)(request, timeout=self.timeout_s)
        return status_from_proto(status)

    async def configure_round(
        self, spec: RoundSpec, *, strategy_name: str = "", strategy_params_json: str = ""
    ) -> Round:
        request = coordinator_pb2.ConfigureRoundRequest(
            **spec_fields(spec),
            start=False,
            strategy_name=strategy_name,
            strategy_params_json=strategy_params_json,
        )
        return await self._call("ConfigureRound", request)

    async def watch_round(self, round_id: str, timeout_s: float) -> AsyncGenerator[Round, None]:
        # Bounded: a connection that died without a word would otherwise hold the watch
        # forever; the caller looks at the round's status after a timeout and watches again.
        # Brief: the accepted updates' events, which the manager skips, come without the
        # round's lists (O(participants) each).
        request = coordinator_pb2.WatchRoundRequest(round_id=round_id, brief=True)
        call = self._stub.WatchRound(request, timeout=timeout_s)
        try:
            with rpc_errors("Coordinator.WatchRound"):
                async for event in call:
                    if event.type != coordinator_pb2.ROUND_EVENT_TYPE_UPDATE_ACCEPTED:
                        yield status_from_proto(event.status)
        finally:
            call.cancel()

    async def start_round(self, round_id: str) -> Round:
        return await self._call("StartRound", coordinator_pb2.StartRoundRequest(round_id=round_id))

    async def get_round_status(self, round_id: str) -> Round:
        request = coordinator_pb2.GetRoundStatusRequest(round_id=round_id)
        return await self._call("GetRoundStatus", request)

    async def report_failure(self, round_id: str, proplet_id: str, reason: str) -> RoundState:
        request = coordinator_pb2.ReportParticipantFailureRequest(
            round_id=round_id, proplet_id=proplet_id, reason=reason, brief=True
        )
        with rpc_errors("Coordinator.ReportParticipantFailure"):
            status = await self._stub.ReportParticipantFailure(request, timeout=self.timeout_s)
        return STATE_OF[status.state]
