"""The manager's view of the Coordinator: the three round calls it makes, behind a Protocol so
the orchestration can be exercised without a network."""

from __future__ import annotations

from typing import Any, Protocol

import grpc

from propeller.v1 import coordinator_pb2
from server.errors import from_rpc_error


class RoundService(Protocol):
    async def configure_round(
        self, request: coordinator_pb2.ConfigureRoundRequest
    ) -> coordinator_pb2.RoundStatus: ...

    async def start_round(self, round_id: str) -> coordinator_pb2.RoundStatus: ...

    async def get_round_status(self, round_id: str) -> coordinator_pb2.RoundStatus: ...


class CoordinatorClient:
    """`RoundService` over a `CoordinatorStub`; failures keep their status code
    (ALREADY_EXISTS stays ALREADY_EXISTS) through `from_rpc_error`."""

    def __init__(self, stub: Any, timeout_s: float) -> None:
        self._stub = stub
        self.timeout_s = timeout_s

    async def configure_round(
        self, request: coordinator_pb2.ConfigureRoundRequest
    ) -> coordinator_pb2.RoundStatus:
        try:
            status: coordinator_pb2.RoundStatus = await self._stub.ConfigureRound(
                request, timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "Coordinator.ConfigureRound") from None
        return status

    async def start_round(self, round_id: str) -> coordinator_pb2.RoundStatus:
        try:
            status: coordinator_pb2.RoundStatus = await self._stub.StartRound(
                coordinator_pb2.StartRoundRequest(round_id=round_id), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "Coordinator.StartRound") from None
        return status

    async def get_round_status(self, round_id: str) -> coordinator_pb2.RoundStatus:
        try:
            status: coordinator_pb2.RoundStatus = await self._stub.GetRoundStatus(
                coordinator_pb2.GetRoundStatusRequest(round_id=round_id), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "Coordinator.GetRoundStatus") from None
        return status
