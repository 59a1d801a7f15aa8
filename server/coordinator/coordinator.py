"""The coordinator's behaviour over time: configuring and starting rounds, taking updates
(checked against the round, their provenance and the poisoning bounds) and participant
failures, closing rounds (k_of_n, deadline, or failures), aggregating through a
`ModelBackend`, storing the new version with its lineage, announcing it (through the store's
outbox: at least once), and telling watchers about every change.

Transport-free: the gRPC servicer and the app wire it to the network; tests may drive it with
an in-process backend.

`Coordinator` holds the rounds' locks and decides; what it runs between its decisions has a
module each: the aggregation and the model's storing (`aggregation`), publishing the outbox
(`outbox`), a replica's lease and watch (`replicas`), a site's partial and reports to its root
(`aggregation.forward_partial`, `site`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from server import metrics, tracing
from server.aggregator.strategies import strategy_class
from server.coordinator import aggregation as A
from server.coordinator import bounds as B
from server.coordinator import rounds as R
from server.coordinator import site as S
from server.coordinator.audit import (
    Auditor,
    apply_policy,
    check_auditable,
    draw_seed,
    unaudited,
)
from server.coordinator.backend import BaseModel, Lineage, ModelBackend, RetryPolicy
from server.coordinator.checks import OpenRoundMembers, UpdateChecks
from server.coordinator.events import Event, EventType, Watchers
from server.coordinator.fuel import FuelPlausibility
from server.coordinator.outbox import Outbox, Publish
from server.coordinator.records import Notice
from server.coordinator.replicas import Replica, RoundLeases, keep_lease, watch_replicated
from server.coordinator.rounds import Round, Update
from server.coordinator.store import RoundStore, RoundUpdates, update_headers
from server.errors import PropellerError
from server.faults import crash_point
from server.messages import RoundComplete
from server.round_spec import DEFAULT_TIMEOUT_S, RoundSpec, validate, with_defaults
from server.topics import Topics

# The coordinator's values, importable from here as before they had modules of their own.
__all__ = [
    "BaseModel",
    "Coordinator",
    "Event",
    "EventType",
    "Lineage",
    "ModelBackend",
    "RetryPolicy",
    "Submitted",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class Submitted:
    """The answer to an update: the round after it, and whether it was a repeat."""

    round: Round
    duplicate: bool


class Coordinator:
    """Owns the rounds (through `store`) and the tasks that finish them."""

    def __init__(
        self,
        store: RoundStore,
        backend: ModelBackend,
        publish: Publish,
        topics: Topics,
        *,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        clock: Clock = time.time,
        bounds: B.UpdateBounds | None = None,
        samples_cap: B.NumSamplesCap | None = None,
        datasets: B.DatasetSizes | None = None,
        hierarchy: S.Hierarchy | None = None,
        upstream: S.Upstream | None = None,
        replica: Replica | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        self.store = store
        # Re-runs a seeded sample of each round's updates (`audit`); None: rounds that ask for
        # an audit are refused.
        self.auditor = auditor
        # One of several replicas on one database (`server.coordinator.replicas`): rounds
        # locked across them, deadlines and aggregations leased.
        self.replica = replica
        self._leases: RoundLeases | None = None
        if replica is not None:
            if not isinstance(store, RoundLeases):
                raise ValueError("replica: replicas need a store they share (PostgreSQL)")
            self._leases = store
            store.lease_aggregations(replica.replica_id, replica.lease_s, clock)
        self.backend = backend
        self.publish = publish
        self.topics = topics
        self.default_timeout_s = default_timeout_s
        self.retry = retry or RetryPolicy()
        self.clock = clock
        # Hierarchical aggregation (`site`): a site coordinator forwards each round's partial
        # to `upstream` (its root) instead of storing a model.
        self.hierarchy = hierarchy or S.Hierarchy()
        if (self.hierarchy.tier == S.SITE) != (upstream is not None):
            raise ValueError("a site coordinator, and only one, has an upstream root")
        self.upstream = upstream
        # Unless told: the dataset's size when there is a data store to ask, else no cap
        # (the app always says: `CoordinatorConfig.num_samples_cap`).
        self.checks = UpdateChecks(
            backend,
            bounds or B.UpdateBounds(),
            samples_cap or B.NumSamplesCap("dataset" if datasets else "none"),
            datasets,
        )
        # A round's fuel plausibility rule (`fuel`), judged once an update's signature held.
        self.fuel = FuelPlausibility(store)
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers = Watchers()
        self._finishing: dict[str, asyncio.Task[None]] = {}
        # A site's reports to its root of rounds that failed here.
        self._reports: set[asyncio.Task[None]] = set()
        self._members = OpenRoundMembers()
        # Replicas publish a round's notice under its lock: only one of them does.
        self.outbox = Outbox(store, publish, None if replica is None else self._lock)

    # ---- rounds ------------------------------------------------------------------------

    @asynccontextmanager
    async def _lock(self, round_id: str) -> AsyncIterator[None]:
        """The round's read-modify-write section: one at a time in this process, and, among
        replicas, one at a time across them (every section reads the round afresh)."""
        lock = self._locks.get(round_id)
        if lock is None:
            lock = self._locks[round_id] = asyncio.Lock()
        async with lock:
            if self._leases is None:
                yield
            else:
                async with self._leases.round_lock(round_id):
                    yield

    async def get(self, round_id: str) -> Round:
        return R.require_round(await self.store.get(round_id), round_id)

    async def list(self, experiment_id: str = "") -> list[Round]:
        return await self.store.list(experiment_id)

    async def configure(self, spec: RoundSpec, *, start: bool = False) -> Round:
        """Check `spec` and create the round (its base model resolved in the registry, zeros
        replaced by the defaults), or return the existing one when the same configuration
        arrives again. `start` opens it at once (also on a repeat that finds it still
        PENDING)."""
        cfg = with_defaults(validate(spec), self.default_timeout_s)
        if self.hierarchy.hierarchical:
            S.check_composes(cfg.strategy_name)
        if cfg.audit.enabled:
            check_auditable(self.auditor, root=self.hierarchy.tier == S.ROOT)
        tracing.remember_round(cfg.round_id)
        async with self._lock(cfg.round_id):
            rnd = await self.store.get(cfg.round_id)
            if rnd is not None:
                R.check_same_config(rnd, cfg)
            else:
                base = await self.backend.resolve(cfg.model_ref)
                if self.upstream is not None:
                    root = await S.root_round(self.upstream, cfg.round_id)
                    S.check_against_root(cfg, base.uri, root, self.hierarchy.site_id)
                    # Before the round is stored: one that cannot close in time is refused
                    # whole (its start, later, checks again against the root's deadline).
                    S.check_deadline(self.clock() + cfg.timeout_s, cfg.timeout_s, root)
                rnd = R.new_round(cfg, base.uri, base.specs, self.clock(), base.sha256, draw_seed())
                await self.store.put(rnd)
                metrics.round_entered(rnd.state.value)
                log.info(
                    "[Coordinator.ConfigureRound] round_id=%s participants=%d k_of_n=%d "
                    "model_ref=%s timeout_s=%s",
                    rnd.round_id,
                    len(rnd.participants),
                    rnd.k_of_n,
                    rnd.model_ref,
                    rnd.timeout_s,
                )
            if start and rnd.state is R.RoundState.PENDING:
                rnd = await self._start_locked(rnd)
            return rnd

    async def start(self, round_id: str) -> Round:
        await self.get(round_id)  # NOT_FOUND before a lock exists for an unknown id
        async with self._lock(round_id):
            return await self._start_locked(await self.get(round_id))

    async def _start_locked(self, rnd: Round) -> Round:
        started = R.start_round(rnd, self.clock())
        if started is not rnd and self.upstream is not None:
            root = await S.root_round(self.upstream, rnd.round_id)
            S.check_deadline(started.deadline, started.timeout_s, root)
        if started is not rnd:
            await self.store.put(started)
            self._emit(EventType.STARTED, started)
            log.info(
                "[Coordinator.StartRound] round_id=%s deadline=%.3f", rnd.round_id, started.deadline
            )
        return started

    @tracing.traced("accept update")
    async def submit(self, round_id: str, update: Update) -> Submitted:
        """Take one participant's update; see `rounds.admit` and `checks.UpdateChecks` for the
        rules. The update that
        reaches k_of_n closes the round and starts aggregation in the background, so this
        returns at once (state AGGREGATING)."""
        rnd = await self.get(round_id)
        if self._members.admit(rnd, update.proplet_id):
            return Submitted(rnd, duplicate=True)
        update = await self.checks.check(rnd, update)
        await self.fuel.check(rnd, update)
        async with self._lock(round_id):
            rnd = await self.get(round_id)
            if self._members.admit(rnd, update.proplet_id):
                return Submitted(rnd, duplicate=True)
            rnd = R.record_update(rnd, update.proplet_id)
            # One transaction: the update row and the round that counts it. The caller answers
            # only after this returns, i.e. after the commit. A caller that goes away meanwhile
            # (a cancelled RPC) must not split the commit from what follows it: the k-th update
            # starts the aggregation.
            await _to_the_end(self._accepted(rnd, update))
            return Submitted(rnd, duplicate=False)

    async def _accepted(self, rnd: Round, update: Update) -> None:
        await self.store.accept(rnd, update)
        log.info(
            "[Coordinator.SubmitUpdate] round_id=%s proplet_id=%s num_samples=%d fuel=%d "
            "num_updates=%d k_of_n=%d distance=%.6g clip_scale=%.6g signed=%s",
            rnd.round_id,
            update.proplet_id,
            update.num_samples,
            update.fuel_consumed,
            rnd.num_updates,
            rnd.k_of_n,
            update.distance,
            update.clip_scale,
            bool(update.certificate),
        )
        self._emit(EventType.UPDATE_ACCEPTED, rnd, update.proplet_id)
        if self.auditor is not None and rnd.audit.enabled:
            self.auditor.begin(rnd, update)
        if rnd.state is R.RoundState.AGGREGATING:
            self._begin_aggregation(rnd)

    async def participant_failed(self, round_id: str, proplet_id: str, reason: str) -> Round:
        """`proplet_id` cannot report in this round (its task failed or was stopped): see
        `rounds.participant_failed`. Fails the round at once, with the reasons, when fewer
        than its floor can still report; closes it when every one that still can has."""
        await self.get(round_id)  # NOT_FOUND before a lock exists for an unknown id
        async with self._lock(round_id):
            rnd = await self.get(round_id)
            after = R.participant_failed(rnd, proplet_id, reason, self.clock())
            if after is rnd:
                return rnd
            await self.store.put(after)
            log.warning(
                "[Coordinator.ReportParticipantFailure] round_id=%s proplet_id=%s reason=%s "
                "failed=%d reachable=%d floor=%d",
                round_id,
                proplet_id,
                reason,
                len(after.failed),
                after.reachable,
                after.floor,
            )
            if after.state is rnd.state:
                return after
            if after.state is R.RoundState.FAILED:
                log.warning("[Coordinator] round_id=%s failed: %s", round_id, after.failure_reason)
                self._emit(EventType.FAILED, after)
            elif after.state is R.RoundState.AGGREGATING:
                self._begin_aggregation(after)
            return after

    # ---- deadlines ---------------------------------------------------------------------

    async def close_due(self) -> None:
        """Close every open round whose deadline has passed. A replica closes those it
        claims, and aggregates again those whose aggregating replica's lease expired."""
        now = self.clock()
        if self._leases is not None and self.replica is not None:
            claimed = await self._leases.claim_due(
                self.replica.replica_id, now, self.replica.lease_s
            )
            if claimed:
                crash_point("coordinator.deadline_claimed")
            for round_id in claimed:
                await self._take_over(round_id)
            return
        for rnd in await self.store.due(now):
            await self._close_at_deadline(rnd.round_id)

    async def _take_over(self, round_id: str) -> None:
        """A round this replica claimed: close it if still due, or aggregate it again if its
        aggregating replica went away."""
        async with self._lock(round_id):
            rnd = await self.get(round_id)
            if rnd.state is R.RoundState.AGGREGATING and round_id not in self._finishing:
                log.info(
                    "[Coordinator.replica] round_id=%s taken over: aggregating again from %d "
                    "stored updates",
                    round_id,
                    rnd.num_updates,
                )
                self._begin_aggregation(rnd, resumed=True)
                return
        await self._close_at_deadline(round_id)

    async def _close_at_deadline(self, round_id: str) -> None:
        async with self._lock(round_id):
            rnd = await self.get(round_id)
            now = self.clock()
            if not R.is_due(rnd, now):
                return
            rnd = R.close_at_deadline(rnd, now)
            await self.store.put(rnd)
            if rnd.state is R.RoundState.FAILED:
                log.warning(
                    "[Coordinator.deadline] round_id=%s failed: %s", round_id, rnd.failure_reason
                )
                self._emit(EventType.FAILED, rnd)
            else:
                log.info(
                    "[Coordinator.deadline] round_id=%s closing with %d of %d updates",
                    round_id,
                    rnd.num_updates,
                    rnd.k_of_n,
                )
                self._begin_aggregation(rnd)

    async def run_deadlines(self, tick_s: float) -> None:
        """Forever: close due rounds every `tick_s` seconds. Cancel to stop."""
        while True:
            try:
                await self.close_due()
            except Exception:
                log.exception("[Coordinator.deadline] closing due rounds failed")
            await asyncio.sleep(tick_s)

    async def resume(self) -> None:
        """After a restart, carry on from the stored state:
        - AGGREGATING rounds (closed, new model not recorded yet) are aggregated again from
          their stored updates; the registry is asked first whether the earlier attempt already
          stored that exact model, so it is never stored twice;
        - OPEN rounds keep their absolute deadline; those whose deadline passed while the
          coordinator was down close now (aggregate what arrived, or fail with none);
        - COMPLETED and FAILED rounds are never touched again.
        A replica takes only what it claims (`close_due`): an aggregating round whose
        replica's lease has expired."""
        rounds = await self.store.list()
        by_state = Counter(r.state.value for r in rounds)
        log.info(
            "[Coordinator.resume] rounds=%d %s",
            len(rounds),
            " ".join(f"{k}={v}" for k, v in sorted(by_state.items())),
        )
        for rnd in rounds if self.replica is None else ():
            if rnd.state is R.RoundState.AGGREGATING and rnd.round_id not in self._finishing:
                log.info(
                    "[Coordinator.resume] round_id=%s aggregating again from %d stored updates",
                    rnd.round_id,
                    rnd.num_updates,
                )
                self._begin_aggregation(rnd, resumed=True)
        await self.close_due()

    # ---- aggregation -------------------------------------------------------------------

    def _begin_aggregation(self, rnd: Round, *, resumed: bool = False) -> None:
        """Announce AGGREGATING and run the aggregation in its own task (called under the
        round's lock, right after the round went AGGREGATING, or by `resume`)."""
        self._emit(EventType.AGGREGATING, rnd)
        finish = tracing.in_round(rnd.round_id, "aggregate", self._finish(rnd.round_id, resumed))
        task = asyncio.create_task(finish, name=f"finish-{rnd.round_id}")
        self._finishing[rnd.round_id] = task
        round_id = rnd.round_id

        def done(_task: asyncio.Task[None]) -> None:
            if self._finishing.get(round_id) is _task:
                del self._finishing[round_id]

        task.add_done_callback(done)

    async def _finish(self, round_id: str, resumed: bool) -> None:
        renewing: asyncio.Task[None] | None = None
        if self.replica is not None:
            try:
                claimed = await self._holds_lease(round_id)
            except PropellerError as exc:
                # Left unclaimed: the claim loop (this replica's or another's) takes it.
                log.warning("[Coordinator.replica] round_id=%s not claimed: %s", round_id, exc)
                return
            if not claimed:
                log.info(
                    "[Coordinator.replica] round_id=%s aggregated by another replica", round_id
                )
                return
            crash_point("coordinator.aggregation_claimed")
            assert self._leases is not None
            renewing = asyncio.create_task(
                keep_lease(self._leases, self.replica, round_id, self.clock),
                name=f"lease-{round_id}",
            )
        try:
            if self.upstream is not None:
                await self._aggregate_and_forward(round_id, self.upstream)
            else:
                await self._aggregate_and_store(round_id, resumed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("[Coordinator.aggregate] round_id=%s unexpected error", round_id)
            await self._fail(round_id, "aggregation failed: internal error (see coordinator log)")
        finally:
            if renewing is not None:
                renewing.cancel()

    async def _holds_lease(self, round_id: str) -> bool:
        """Take or keep the round's lease (a replica); always True for a single coordinator."""
        if self._leases is None or self.replica is None:
            return True
        r = self.replica
        return await self._leases.claim(round_id, r.replica_id, self.clock(), r.lease_s)

    async def _still_aggregating(self, rnd: Round) -> bool:
        """Under the round's lock, before the aggregation's outcome is written: the round is
        still AGGREGATING and (a replica) still this replica's, else the outcome is dropped
        (another replica took the round over, and writes its own)."""
        if rnd.state is not R.RoundState.AGGREGATING:
            log.warning(
                "[Coordinator.aggregate] round_id=%s is %s already: outcome dropped",
                rnd.round_id,
                rnd.state.value,
            )
            return False
        if self.replica is not None and not await self._holds_lease(rnd.round_id):
            log.warning(
                "[Coordinator.replica] round_id=%s lease lost: outcome dropped", rnd.round_id
            )
            return False
        return True

    async def _aggregate_and_store(self, round_id: str, resumed: bool) -> None:
        to_aggregate = await self._to_aggregate(round_id)
        if to_aggregate is None:
            return
        rnd, updates = to_aggregate
        strategy = strategy_class(rnd.strategy_name)
        try:
            model = await A.new_model(self.backend, self.store, self.retry, rnd, updates, strategy)
        except PropellerError as exc:
            await self._fail(round_id, f"aggregation failed: {exc}")
            return
        if not await self._holds_lease(round_id):
            # Another replica took the round over while this one stalled: it stores the model.
            log.warning("[Coordinator.replica] round_id=%s lease lost: not stored", round_id)
            return
        store_began = time.perf_counter()
        try:
            version, uri = await A.store_model(self.backend, self.retry, model, resumed)
        except PropellerError as exc:
            await self._fail(round_id, f"storing the new model failed: {exc}")
            return
        metrics.phase_took("store", store_began)
        crash_point("coordinator.model_stored")
        weighted = R.weighted_metrics(update_headers(updates))
        async with self._lock(round_id):
            rnd = await self.get(round_id)
            if not await self._still_aggregating(rnd):
                return
            rnd = R.complete(rnd, version, uri, weighted, self.clock())
            message = RoundComplete(
                round_id=round_id,
                new_model_version=version,
                model_uri=uri,
                num_updates=rnd.num_updates,
                closed_by=rnd.closed_by,
            )
            # The completion and its notification in one transaction (the outbox): a crash
            # before the publish below leaves it unsent, and the next start publishes it.
            notice = Notice(round_id, self.topics.round_next, message.to_json())
            # The strategy's new state too: it is applied exactly when the round completes.
            await self.store.put(rnd, notice, model.state)
            self._emit(EventType.COMPLETED, rnd)
        log.info(
            "[Coordinator.aggregate] round_id=%s completed new_model_uri=%s num_updates=%d "
            "closed_by=%s",
            round_id,
            uri,
            rnd.num_updates,
            rnd.closed_by,
        )
        crash_point("coordinator.round_completed")
        await self.outbox.deliver(notice)

    async def _aggregate_and_forward(self, round_id: str, upstream: S.Upstream) -> None:
        """A site round's end: its updates' weighted mean and sample total (the partial),
        submitted to the root as the site's update; the round completes once the root took
        it. Aggregated again after a restart, the same partial reaches the root, which counts
        the site once (a repeat is answered as a duplicate)."""
        to_aggregate = await self._to_aggregate(round_id)
        if to_aggregate is None:
            return
        rnd, updates = to_aggregate
        headers = update_headers(updates)
        site_id = self.hierarchy.site_id
        try:
            partial = await A.forward_partial(
                self.backend, upstream, self.retry, rnd, updates, site_id
            )
        except PropellerError as exc:
            await self._fail(round_id, f"forwarding the site's partial failed: {exc}")
            return
        async with self._lock(round_id):
            rnd = await self.get(round_id)
            if not await self._still_aggregating(rnd):
                return
            done = R.complete(rnd, 0, "", partial.metrics, self.clock())
            rnd = replace(done, new_model_version=None)
            await self.store.put(rnd)
            self._emit(EventType.COMPLETED, rnd)
        log.info(
            "[Coordinator.site] round_id=%s site_id=%s partial of %d updates, num_samples=%d "
            "accepted by the root",
            round_id,
            self.hierarchy.site_id,
            len(headers),
            partial.num_samples,
        )

    async def _to_aggregate(self, round_id: str) -> tuple[Round, RoundUpdates] | None:
        """The round and the updates to aggregate: all of them, or those its audit leaves;
        None when the audit failed the round. Updates are read in arrival order, so
        aggregating again after a restart gives exactly the same bytes (and the same sha256)
        as the first attempt."""
        rnd = await self.get(round_id)
        updates = await self.store.updates(round_id)
        if not rnd.audit.enabled:
            return rnd, updates
        return await self._audit(rnd, updates)

    async def _audit(self, rnd: Round, updates: RoundUpdates) -> tuple[Round, RoundUpdates] | None:
        """The round's re-execution audit at its close (`audit`): its outcomes recorded with
        the round, and the updates the policy leaves to aggregate; None when the round failed
        for want of updates (or is no longer this coordinator's to finish)."""
        if rnd.audits:  # recorded before a restart: the same outcomes, not a second re-run
            outcomes = rnd.audits
        elif self.auditor is not None:
            outcomes = await self.auditor.outcomes(rnd, updates)
        else:  # a round resumed by a coordinator without an auditor
            outcomes = unaudited(rnd, updates, "audit error: this coordinator has no auditor")
        verdict = apply_policy(rnd, outcomes, updates)
        async with self._lock(rnd.round_id):
            current = await self.get(rnd.round_id)
            if not await self._still_aggregating(current):
                return None
            if current.audits != verdict.round.audits:
                current = replace(current, audits=verdict.round.audits)
                await self.store.put(current)
        if verdict.failure:
            await self._fail(rnd.round_id, verdict.failure)
            return None
        return current, verdict.updates

    async def update_totals(self, round_id: str) -> tuple[int, int]:
        """The accepted updates' num_samples (on a root: every site's proplets') and
        fuel_consumed, each summed, less the updates the re-execution audit left out of the
        aggregation."""
        rnd = await self.get(round_id)
        out = {a.proplet_id for a in rnd.audits if a.rejected}
        headers = [
            u for u in update_headers(await self.store.updates(round_id)) if u.proplet_id not in out
        ]
        return sum(u.num_samples for u in headers), sum(u.fuel_consumed for u in headers)

    # ---- the outbox (`outbox.Outbox`) -----------------------------------------------------

    async def deliver_unsent(self) -> bool:
        """Publish every notice the store holds unsent; True if all went out."""
        return await self.outbox.deliver_unsent()

    async def run_outbox(self, retry_s: float) -> None:
        """Forever: publish what the outbox holds unsent, at start (what a crash left) and
        after a failed publish, every `retry_s` seconds until it goes out. Cancel to stop."""
        await self.outbox.run(retry_s)

    async def _fail(self, round_id: str, reason: str) -> None:
        async with self._lock(round_id):
            rnd = await self.get(round_id)
            if not await self._still_aggregating(rnd):
                return
            rnd = R.fail(rnd, reason, self.clock())
            await self.store.put(rnd)
            self._emit(EventType.FAILED, rnd)
        log.error("[Coordinator.aggregate] round_id=%s failed: %s", round_id, reason)

    # ---- events ------------------------------------------------------------------------

    def _emit(self, kind: EventType, rnd: Round, proplet_id: str = "") -> None:
        if kind not in (EventType.UPDATE_ACCEPTED, EventType.SNAPSHOT):  # a change of state
            metrics.round_entered(rnd.state.value)
        if rnd.state is not R.RoundState.OPEN:
            self._members.forget(rnd.round_id)
        if kind is EventType.FAILED and self.auditor is not None:
            self.auditor.forget(rnd.round_id)
        self._watchers.tell(Event(kind, rnd, self.clock(), proplet_id))
        if kind is EventType.FAILED and self.upstream is not None:
            self._tell_root_failed(rnd, self.upstream)

    def _tell_root_failed(self, rnd: Round, upstream: S.Upstream) -> None:
        """A site round failed: tell the root, in the background (`site.report_failed_round`)."""
        report = S.report_failed_round(upstream, self.retry, rnd, self.hierarchy.site_id)
        task = asyncio.create_task(report, name=f"report-{rnd.round_id}")
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def watch(self, round_id: str) -> AsyncIterator[Event]:
        """A SNAPSHOT of the round, then one event per change, ending after COMPLETED or
        FAILED (at once when the round already finished)."""
        queue: asyncio.Queue[Event] | None = None
        await self.get(round_id)  # NOT_FOUND before a lock exists for an unknown id
        async with self._lock(round_id):
            rnd = await self.get(round_id)
            if not rnd.finished:
                queue = self._watchers.add(round_id)
        try:
            yield Event(EventType.SNAPSHOT, rnd, self.clock())
            if queue is None:
                return
            if self.replica is not None:
                poll_s = self.replica.watch_poll_s
                async for event in watch_replicated(self.store, rnd, queue, poll_s, self.clock):
                    yield event
                return
            while True:
                event = await queue.get()
                yield event
                if event.round.finished:  # COMPLETED or FAILED: nothing follows
                    return
        finally:
            if queue is not None:
                self._watchers.discard(round_id, queue)

    # ---- lifecycle ---------------------------------------------------------------------

    async def wait_finishing(self) -> None:
        """Wait for the aggregations in flight (tests, graceful shutdown)."""
        while self._finishing or self._reports:
            tasks = [*self._finishing.values(), *self._reports]
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel the aggregations in flight; their rounds stay AGGREGATING for `resume`."""
        if self.auditor is not None:
            await self.auditor.aclose()
        tasks = [*self._finishing.values(), *self._reports]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _to_the_end(aw: Awaitable[None]) -> None:
    """Await `aw`; if the caller is cancelled meanwhile, still let `aw` finish (holding whatever
    the caller holds, e.g. the round's lock) before the cancellation goes on."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            log.error("[Coordinator] after a cancelled call: %s", task.exception())
        raise
