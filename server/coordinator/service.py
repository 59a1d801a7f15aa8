"""The Coordinator gRPC servicer: proto <-> domain translation around `Coordinator`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator

from propeller.v1 import coordinator_pb2, coordinator_pb2_grpc, tensor_pb2
from server import authz, metrics
from server.coordinator import rounds as R
from server.coordinator import site as S
from server.coordinator.coordinator import Coordinator, Event, EventType
from server.coordinator.wire import STATES, answer_round, spec_from_proto, status_to_proto
from server.errors import InvalidArgument, PermissionDenied, grpc_errors
from server.grpc_server import Context, ServiceBinding
from server.ids import MAX_PARTICIPANTS, check_count, check_id, check_ids, check_name, check_text
from server.paging import page_in_order
from server.pki import Kind
from server.streams import SPOOL_ABOVE, read_update_stream
from server.tensors import total_bytes

log = logging.getLogger(__name__)


SERVICE_NAME: str = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name

_EVENTS: dict[EventType, coordinator_pb2.RoundEventType] = {
    EventType.SNAPSHOT: coordinator_pb2.ROUND_EVENT_TYPE_SNAPSHOT,
    EventType.STARTED: coordinator_pb2.ROUND_EVENT_TYPE_STARTED,
    EventType.UPDATE_ACCEPTED: coordinator_pb2.ROUND_EVENT_TYPE_UPDATE_ACCEPTED,
    EventType.AGGREGATING: coordinator_pb2.ROUND_EVENT_TYPE_AGGREGATING,
    EventType.COMPLETED: coordinator_pb2.ROUND_EVENT_TYPE_COMPLETED,
    EventType.FAILED: coordinator_pb2.ROUND_EVENT_TYPE_FAILED,
}


def check_update_header(header: tensor_pb2.UpdateHeader, field: str = "update.header") -> None:
    """The ids, the base model reference and the metrics of an update's header within the
    rules of `server.ids` (the tensors are the stream reader's)."""
    check_id(header.round_id, f"{field}.round_id")
    check_id(header.proplet_id, f"{field}.proplet_id")
    check_text(header.base_model_uri, f"{field}.base_model_uri")
    check_count(header.metrics, f"{field}.metrics")
    for name in header.metrics:
        check_name(name, f"{field}.metrics")
    check_ids(header.contributors, f"{field}.contributors", MAX_PARTICIPANTS)
    if len(set(header.contributors)) != len(header.contributors):
        raise InvalidArgument(f"{field}.contributors: a contributor is named twice")


def event_to_proto(event: Event, *, brief: bool = False) -> coordinator_pb2.RoundEvent:
    """The event on the wire; with `brief` an accepted update's status leaves out the
    round's per-participant lists (WatchRoundRequest.brief)."""
    return coordinator_pb2.RoundEvent(
        type=_EVENTS[event.type],
        status=status_to_proto(
            event.round, brief=brief and event.type is EventType.UPDATE_ACCEPTED
        ),
        proplet_id=event.proplet_id,
        timestamp=event.timestamp,
    )


class CoordinatorServicer:
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    async def ConfigureRound(
        self, request: coordinator_pb2.ConfigureRoundRequest, context: Context
    ) -> coordinator_pb2.RoundStatus:
        async with grpc_errors(context, "Coordinator.ConfigureRound"):
            rnd = await self.coordinator.configure(spec_from_proto(request), start=request.start)
            return status_to_proto(rnd)

    async def StartRound(
        self, request: coordinator_pb2.StartRoundRequest, context: Context
    ) -> coordinator_pb2.RoundStatus:
        return await answer_round(
            context, "Coordinator.StartRound", request.round_id, self.coordinator.start
        )

    @metrics.counts_updates
    async def SubmitUpdate(
        self, request_iterator: AsyncIterable[tensor_pb2.UpdateChunk], context: Context
    ) -> coordinator_pb2.SubmitUpdateResponse:
        async with grpc_errors(context, "Coordinator.SubmitUpdate"):
            header, tensors = await read_update_stream(
                request_iterator, spool_above=SPOOL_ABOVE, on_header=self._check_header
            )
            update = R.Update(
                proplet_id=header.proplet_id,
                base_model_uri=header.base_model_uri,
                num_samples=header.num_samples,
                metrics=dict(header.metrics),
                tensors=tensors,
                received_at=self.coordinator.clock(),
                base_model_sha256=header.base_model_sha256,
                module_digest=header.module_digest,
                signature=header.signature,
                # Over mutual TLS the signature is checked against the caller's own
                # certificate (authz admitted it as this proplet); over plaintext there is
                # none to check it with.
                certificate=authz.caller_certificate(),
                contributors=tuple(header.contributors),
                fuel_consumed=header.fuel_consumed,
            )
            result = await self.coordinator.submit(header.round_id, update)
            return coordinator_pb2.SubmitUpdateResponse(
                round_id=header.round_id,
                proplet_id=header.proplet_id,
                accepted=True,
                duplicate=result.duplicate,
                num_updates=result.round.num_updates,
                k_of_n=result.round.k_of_n,
                state=STATES[result.round.state],
            )

    async def _check_header(self, header: tensor_pb2.UpdateHeader, need: int) -> None:
        """An update is refused from its header, before its bytes arrive: bad ids, a caller
        submitting for another proplet or to a round it is not in (`_check_submitter`), a
        round that does not exist or does not take this proplet's update now, or more bytes
        than the round's base model has (the whole update must match it)."""
        check_update_header(header)
        await self._check_submitter(header.round_id, header.proplet_id)
        self._check_contributors(header)
        rnd = await self.coordinator.get(header.round_id)
        duplicate = R.admit(rnd, header.proplet_id)
        model_bytes = total_bytes(rnd.specs)
        if need > model_bytes:
            raise InvalidArgument(
                f"update.header.tensors: {need} bytes, but round {rnd.round_id!r}'s base model "
                f"{rnd.model_ref} has {model_bytes}"
            )
        if not duplicate:  # a repeat is answered as the duplicate it is
            R.check_claims(header)

    async def _check_submitter(self, round_id: str, proplet_id: str) -> None:
        """An authenticated proplet submits only as itself and only to a round it is a
        participant of; to a root coordinator only site coordinators submit, each as its own
        site (PERMISSION_DENIED otherwise; nothing counted)."""
        authz.require_self(proplet_id)
        who = authz.caller()
        if who is None:
            return  # plaintext: the round's own membership rule answers (FAILED_PRECONDITION)
        root = self.coordinator.hierarchy.tier == S.ROOT
        if who.kind is Kind.PROPLET and root:
            raise PermissionDenied(
                f"SubmitUpdate: proplet {who.name!r} submits to its site's coordinator; this "
                "root coordinator takes only the sites' partial aggregates"
            )
        if who.kind is Kind.SERVICE:
            site_id = S.site_of(who)
            if not root or site_id is None:
                raise PermissionDenied(
                    f"SubmitUpdate: {who} submits no updates here: only a root coordinator "
                    f"(PROPELLER_COORDINATOR_TIER=root) takes a site coordinator's partial"
                )
            if proplet_id != site_id:
                raise PermissionDenied(
                    f"SubmitUpdate: {who} may only submit as site {site_id!r}, not as "
                    f"{proplet_id!r} (header.proplet_id)"
                )
        if who.kind is Kind.OPERATOR:
            return
        rnd = await self.coordinator.get(round_id)
        if proplet_id not in rnd.participants:
            what = "site" if root else "proplet"
            raise PermissionDenied(
                f"SubmitUpdate: {what} {proplet_id!r} (header.proplet_id) is not a participant "
                f"of round {round_id!r}"
            )

    def _check_site_caller(self, site_id: str, method: str) -> None:
        """A site coordinator calls a root, about its own site only (PERMISSION_DENIED)."""
        who = authz.caller()
        caller_site = None if who is None else S.site_of(who)
        if caller_site is None:
            return
        if self.coordinator.hierarchy.tier != S.ROOT:
            raise PermissionDenied(
                f"{method}: {who} calls a root coordinator only (PROPELLER_COORDINATOR_TIER=root)"
            )
        if site_id != caller_site:
            raise PermissionDenied(
                f"{method}: {who} may only speak for site {caller_site!r}, not {site_id!r} "
                "(proplet_id)"
            )

    def _check_contributors(self, header: tensor_pb2.UpdateHeader) -> None:
        """A root's updates are sites' partials, which name their contributors (their caps
        bound its num_samples); anywhere else an update names none, so a proplet cannot
        raise its own cap by naming others."""
        root = self.coordinator.hierarchy.tier == S.ROOT
        if root and not header.contributors:
            raise InvalidArgument(
                "update.header.contributors: empty, but this root coordinator takes only the "
                "sites' partials, which name the participants they combine"
            )
        if not root and header.contributors:
            raise InvalidArgument(
                "update.header.contributors: only a site's partial to a root coordinator "
                "names contributors"
            )

    async def GetRoundStatus(
        self, request: coordinator_pb2.GetRoundStatusRequest, context: Context
    ) -> coordinator_pb2.RoundStatus:
        async with grpc_errors(context, "Coordinator.GetRoundStatus"):
            check_id(request.round_id, "round_id")
            status = status_to_proto(await self.coordinator.get(request.round_id))
            totals = await self.coordinator.update_totals(request.round_id)
            status.num_samples, status.fuel_consumed = totals
            return status

    async def ListRounds(
        self, request: coordinator_pb2.ListRoundsRequest, context: Context
    ) -> coordinator_pb2.ListRoundsResponse:
        async with grpc_errors(context, "Coordinator.ListRounds"):
            eid = check_id(request.experiment_id, "experiment_id", optional=True)
            # Positions in the list of every round (configuration order, which only grows at
            # its end), so the filter cannot shift a page.
            page = page_in_order(
                request,
                "ListRounds",
                await self.coordinator.list(),
                status_to_proto,
                keep=lambda r: not eid or r.experiment_id == eid,
            )
            return coordinator_pb2.ListRoundsResponse(
                rounds=page.items, next_page_token=page.next_page_token
            )

    async def WatchRound(
        self, request: coordinator_pb2.WatchRoundRequest, context: Context
    ) -> AsyncIterator[coordinator_pb2.RoundEvent]:
        async with grpc_errors(context, "Coordinator.WatchRound"):
            check_id(request.round_id, "round_id")
            async for event in self.coordinator.watch(request.round_id):
                yield event_to_proto(event, brief=request.brief)

    async def ReportParticipantFailure(
        self, request: coordinator_pb2.ReportParticipantFailureRequest, context: Context
    ) -> coordinator_pb2.RoundStatus:
        async with grpc_errors(context, "Coordinator.ReportParticipantFailure"):
            check_id(request.round_id, "round_id")
            check_id(request.proplet_id, "proplet_id")
            self._check_site_caller(request.proplet_id, "ReportParticipantFailure")
            rnd = await self.coordinator.participant_failed(
                request.round_id, request.proplet_id, request.reason
            )
            return status_to_proto(rnd, brief=request.brief)


def binding(coordinator: Coordinator) -> ServiceBinding:
    return ServiceBinding(
        SERVICE_NAME,
        CoordinatorServicer(coordinator),
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server,
    )
