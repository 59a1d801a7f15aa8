"""The coordinator's behaviour over time: configuring and starting rounds, taking updates
(checked against the round, their provenance and the poisoning bounds) and participant
failures, closing rounds (k_of_n, deadline, or failures), aggregating through a
`ModelBackend`, storing the new version with its lineage, announcing it (through the store's
outbox: at least once), and telling watchers about every change.

Transport-free: the gRPC servicer and the app wire it to the network; tests may drive it with
an in-process backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

from server.coordinator import bounds as B
from server.coordinator import rounds as R
from server.coordinator.rounds import Round, Update
from server.coordinator.store import (
    Notice,
    RoundStore,
    RoundUpdates,
    each_update,
    update_headers,
)
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PropellerError,
)
from server.faults import crash_point
from server.messages import RoundComplete
from server.provenance import Claim, check_signature
from server.round_spec import DEFAULT_TIMEOUT_S, RoundSpec, validate, with_defaults
from server.tensors import INLINE_BYTES, Spec, Tensors, nbytes_of, offload_if_big, sha256_of
from server.topics import Topics

log = logging.getLogger(__name__)

T = TypeVar("T")

Publish = Callable[[str, bytes], Awaitable[None]]
Clock = Callable[[], float]

# Downstream errors that another attempt cannot fix.
_PERMANENT: tuple[type[PropellerError], ...] = (
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
)


@dataclass(frozen=True)
class BaseModel:
    """A stored version a round trains from: its uri, tensor specs and sha256."""

    uri: str
    specs: list[Spec]
    sha256: str


@dataclass(frozen=True)
class Lineage:
    """How a version was made, as the registry keeps it beside the version: the round, its
    base model and module, and its updates (with their provenance) in aggregation order."""

    version: int
    model_sha256: str
    round: Round
    updates: RoundUpdates


class ModelBackend(Protocol):
    """What the coordinator needs from the registry and the aggregator."""

    async def resolve(self, model_ref: str) -> BaseModel:
        """The stored model `model_ref` names ("" = the latest); NotFound if there is
        none."""
        ...

    async def base_tensors(self, model_uri: str) -> Tensors:
        """A stored version's tensors (the distance bound measures updates against them)."""
        ...

    async def aggregate(self, round_id: str, updates: RoundUpdates) -> tuple[Tensors, str]:
        """Combine the updates into one model; returns it with the sha256 of its bytes (in
        the returned order), which the backend has verified."""
        ...

    async def put(self, tensors: Tensors, sha256: str) -> tuple[int, str]:
        """Store a model as the registry's next version; returns (version, uri)."""
        ...

    async def find(self, sha256: str, after_version: int) -> tuple[int, str] | None:
        """A stored version newer than `after_version` with exactly these bytes, if any (so a
        retried write whose first attempt did land is not stored twice)."""
        ...

    async def put_lineage(self, lineage: Lineage) -> None:
        """Store the version's lineage with its updates' bytes (idempotent: the same lineage
        again is fine)."""
        ...


class EventType(enum.Enum):
    """What a watcher is told (`Coordinator.watch`): the round as it is, then each change.
    Only the servicer's proto mapping gives these a form outside the process."""

    SNAPSHOT = enum.auto()
    STARTED = enum.auto()
    UPDATE_ACCEPTED = enum.auto()
    AGGREGATING = enum.auto()
    COMPLETED = enum.auto()
    FAILED = enum.auto()


@dataclass(frozen=True)
class Event:
    type: EventType
    round: Round
    timestamp: float
    proplet_id: str = ""


@dataclass(frozen=True)
class Submitted:
    """The answer to an update: the round after it, and whether it was a repeat."""

    round: Round
    duplicate: bool


@dataclass(frozen=True)
class RetryPolicy:
    """Aggregation and the registry write are each tried up to `attempts` times; the wait
    before attempt n+1 is `initial_backoff_s * factor**(n-1)`, capped at `max_backoff_s`. So
    the time spent waiting is bounded by `total_backoff_s()` (plus each attempt's RPC
    timeout); after the last attempt the round fails with the last error as its reason."""

    attempts: int = 5
    initial_backoff_s: float = 0.2
    factor: float = 2.0
    max_backoff_s: float = 5.0

    def backoff_s(self, attempt: int) -> float:
        """The wait after failed attempt `attempt` (1-based)."""
        return min(self.initial_backoff_s * self.factor ** (attempt - 1), self.max_backoff_s)

    def total_backoff_s(self) -> float:
        return sum(self.backoff_s(n) for n in range(1, max(1, self.attempts)))


class _Members:
    """A round's participants and reported proplets as sets, kept in step with its record:
    `reported` only ever grows by appending, so usually one proplet is added."""

    def __init__(self, participants: tuple[str, ...]) -> None:
        self.participants = participants
        self.participant_set = frozenset(participants)
        self.reported: tuple[str, ...] = ()
        self.reported_set: set[str] = set()

    def sync(self, reported: tuple[str, ...]) -> None:
        if reported is self.reported:
            return
        n = len(self.reported)
        if len(reported) == n + 1 and reported[:n] == self.reported:
            self.reported_set.add(reported[n])
        else:
            self.reported_set = set(reported)
        self.reported = reported


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
    ) -> None:
        self.store = store
        self.backend = backend
        self.publish = publish
        self.topics = topics
        self.default_timeout_s = default_timeout_s
        self.retry = retry or RetryPolicy()
        self.clock = clock
        self.bounds = bounds or B.UpdateBounds()
        # Unless told: the dataset's size when there is a data store to ask, else no cap
        # (the app always says: `CoordinatorConfig.num_samples_cap`).
        self.samples_cap = samples_cap or B.NumSamplesCap("dataset" if datasets else "none")
        if self.samples_cap.source == "dataset" and datasets is None:
            raise ValueError("num_samples_cap 'dataset' needs the data store (datasets)")
        self.datasets = datasets
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers: dict[str, set[asyncio.Queue[Event]]] = {}
        self._finishing: dict[str, asyncio.Task[None]] = {}
        self._members: dict[str, _Members] = {}
        # Set when the outbox may hold notices to publish: at start (a crash may have left
        # some) and after a publish failed. `run_outbox` waits for it.
        self._outbox_due = asyncio.Event()
        self._outbox_due.set()
        self._publishing: set[str] = set()

    # ---- rounds ------------------------------------------------------------------------

    def _lock(self, round_id: str) -> asyncio.Lock:
        lock = self._locks.get(round_id)
        if lock is None:
            lock = self._locks[round_id] = asyncio.Lock()
        return lock

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
        async with self._lock(cfg.round_id):
            rnd = await self.store.get(cfg.round_id)
            if rnd is not None:
                R.check_same_config(rnd, cfg)
            else:
                base = await self.backend.resolve(cfg.model_ref)
                rnd = R.new_round(cfg, base.uri, base.specs, self.clock(), base.sha256)
                await self.store.put(rnd)
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
        if started is not rnd:
            await self.store.put(started)
            self._emit(EventType.STARTED, started)
            log.info(
                "[Coordinator.StartRound] round_id=%s deadline=%.3f", rnd.round_id, started.deadline
            )
        return started

    async def submit(self, round_id: str, update: Update) -> Submitted:
        """Take one participant's update; see `rounds.admit` / `rounds.check_provenance` /
        `rounds.validate_update`, `_check_update` and `bounds` for the rules. The update that
        reaches k_of_n closes the round and starts aggregation in the background, so this
        returns at once (state AGGREGATING)."""
        rnd = await self.get(round_id)
        if self._admit(rnd, update.proplet_id):
            return Submitted(rnd, duplicate=True)
        R.check_provenance(rnd, update)
        await self._check_num_samples(update)
        base = await self.backend.base_tensors(rnd.model_ref) if self.bounds.needs_base else None
        nbytes = nbytes_of(update.tensors)
        if nbytes <= INLINE_BYTES:
            checked = self._check_update(rnd, update, base)
            sha = _digest(rnd.specs, update.tensors)
        else:
            # Two passes over a big update at once, each in a thread of its own: its checks,
            # and the sha256 its signature covers.
            checked, sha = await asyncio.gather(
                asyncio.to_thread(self._check_update, rnd, update, base),
                asyncio.to_thread(_digest, rnd.specs, update.tensors),
            )
        update = self._check_signature(rnd, replace(checked, sha256=sha))
        async with self._lock(round_id):
            rnd = await self.get(round_id)
            if self._admit(rnd, update.proplet_id):
                return Submitted(rnd, duplicate=True)
            rnd = R.record_update(rnd, update.proplet_id)
            # One transaction: the update row and the round that counts it. The caller answers
            # only after this returns, i.e. after the commit. A caller that goes away meanwhile
            # (a cancelled RPC) must not split the commit from what follows it: the k-th update
            # starts the aggregation.
            await _to_the_end(self._accepted(rnd, update))
            return Submitted(rnd, duplicate=False)

    async def _check_num_samples(self, update: Update) -> None:
        """`num_samples` within the participant's cap (`bounds.NumSamplesCap`): refused,
        naming the cap, when above it (its weight is what its proplet signed, never
        re-weighted)."""
        if update.num_samples <= 0:
            raise InvalidArgument(f"num_samples: {update.num_samples} must be > 0")
        cap = self.samples_cap
        if cap.source == "none":
            return
        if cap.source == "fixed":
            limit, what = cap.value, f"the coordinator's cap of {cap.value} (num_samples_cap)"
        else:
            assert self.datasets is not None
            try:
                limit = await self.datasets.size(update.proplet_id)
            except NotFound:
                raise FailedPrecondition(
                    f"num_samples: proplet {update.proplet_id!r} has no dataset in the data "
                    "store to cap num_samples by (num_samples_cap=dataset); update not counted"
                ) from None
            what = (
                f"the {limit} samples proplet {update.proplet_id!r} holds in the data store "
                "(num_samples_cap=dataset)"
            )
        if update.num_samples > limit:
            raise InvalidArgument(
                f"num_samples: {update.num_samples} exceeds {what}; update not counted"
            )

    def _check_update(self, rnd: Round, update: Update, base: Tensors | None) -> Update:
        """The update's content (`rounds.validate_update`), its values' magnitude and its
        distance from the base model; returns it with its tensors in the base model's order,
        its distance and clip scale. Runs off the event loop for big updates."""
        update = R.validate_update(rnd, update)
        B.check_magnitude(update.tensors, self.bounds.max_abs_value, "tensors")
        dist, scale = 0.0, 1.0
        if base is not None:
            bound = self.bounds.max_distance
            dist = B.distance(update.tensors, base)
            if dist > bound and not self.bounds.clip:
                raise InvalidArgument(
                    f"tensors: the update is {dist:.6g} from the base model (L2 norm of the "
                    f"difference over all tensors), beyond the coordinator's bound {bound:g} "
                    "(max_update_distance); update not counted"
                )
            scale = B.clip_scale(dist, bound)
        return replace(update, distance=dist, clip_scale=scale)

    @staticmethod
    def _check_signature(rnd: Round, update: Update) -> Update:
        """Over mutual TLS (the call's certificate is known): the update's signature over its
        claim, with the round's base model and the sha256 of the bytes received."""
        if update.certificate:
            claim = Claim.of(
                update,
                round_id=rnd.round_id,
                base_model_sha256=rnd.base_model_sha256,
                update_sha256=update.sha256,
            )
            check_signature(update.certificate, update.signature, claim)
        return update

    def _admit(self, rnd: Round, proplet_id: str) -> bool:
        """`rounds.admit` with an open round's members as sets (a big round's tuples are long;
        rounds in any other state answer from the record itself)."""
        if rnd.state is not R.RoundState.OPEN:
            self._members.pop(rnd.round_id, None)
            return R.admit(rnd, proplet_id)
        members = self._members.get(rnd.round_id)
        if members is None or members.participants is not rnd.participants:
            members = self._members[rnd.round_id] = _Members(rnd.participants)
        members.sync(rnd.reported)
        return R.admit(
            rnd, proplet_id, participants=members.participant_set, reported=members.reported_set
        )

    async def _accepted(self, rnd: Round, update: Update) -> None:
        await self.store.accept(rnd, update)
        log.info(
            "[Coordinator.SubmitUpdate] round_id=%s proplet_id=%s num_samples=%d "
            "num_updates=%d k_of_n=%d distance=%.6g clip_scale=%.6g signed=%s",
            rnd.round_id,
            update.proplet_id,
            update.num_samples,
            rnd.num_updates,
            rnd.k_of_n,
            update.distance,
            update.clip_scale,
            bool(update.certificate),
        )
        self._emit(EventType.UPDATE_ACCEPTED, rnd, update.proplet_id)
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
        """Close every open round whose deadline has passed."""
        now = self.clock()
        for rnd in await self.store.list():
            if R.is_due(rnd, now):
                await self._close_at_deadline(rnd.round_id)

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
        - COMPLETED and FAILED rounds are never touched again."""
        rounds = await self.store.list()
        by_state = Counter(r.state.value for r in rounds)
        log.info(
            "[Coordinator.resume] rounds=%d %s",
            len(rounds),
            " ".join(f"{k}={v}" for k, v in sorted(by_state.items())),
        )
        for rnd in rounds:
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
        task = asyncio.create_task(
            self._finish(rnd.round_id, resumed), name=f"finish-{rnd.round_id}"
        )
        self._finishing[rnd.round_id] = task
        round_id = rnd.round_id

        def done(_task: asyncio.Task[None]) -> None:
            if self._finishing.get(round_id) is _task:
                del self._finishing[round_id]

        task.add_done_callback(done)

    async def _finish(self, round_id: str, resumed: bool) -> None:
        try:
            await self._aggregate_and_store(round_id, resumed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("[Coordinator.aggregate] round_id=%s unexpected error", round_id)
            await self._fail(round_id, "aggregation failed: internal error (see coordinator log)")

    async def _aggregate_and_store(self, round_id: str, resumed: bool) -> None:
        rnd = await self.get(round_id)
        # Updates are read in arrival order, so aggregating again after a restart gives
        # exactly the same bytes (and the same sha256) as the first attempt.
        updates = await self.store.updates(round_id)
        inputs: RoundUpdates = updates
        try:
            if any(u.clip_scale != 1.0 for u in update_headers(updates)):
                base = await self.backend.base_tensors(rnd.model_ref)
                inputs = ClippedUpdates(updates, base)
            aggregated, sha = await self._with_retry(
                "aggregate", round_id, lambda _n: self.backend.aggregate(round_id, inputs)
            )
            nbytes = nbytes_of(aggregated)
            tensors = await offload_if_big(
                nbytes, R.check_tensors, rnd.specs, aggregated, "aggregate"
            )
        except PropellerError as exc:
            await self._fail(round_id, f"aggregation failed: {exc}")
            return
        if list(tensors) != list(aggregated):
            # Put into the base model's order: other bytes, so another digest.
            sha = await offload_if_big(nbytes, sha256_of, tensors)

        async def store_once(attempt: int) -> tuple[int, str]:
            # A retry, or a round resumed after a restart, may follow a write that landed
            # although its reply never arrived: look for those exact bytes first. The
            # version's lineage (its updates as signed) goes right after it; the round is
            # completed only once both are stored, so a crash in between sends it again.
            if attempt > 1 or resumed:
                found = await self.backend.find(sha, rnd.base_version)
                if found is not None:
                    try:
                        await self.backend.put_lineage(Lineage(found[0], sha, rnd, updates))
                        return found
                    except AlreadyExists:
                        pass  # the same bytes, but another round's version: store ours
            stored = await self.backend.put(tensors, sha)
            await self.backend.put_lineage(Lineage(stored[0], sha, rnd, updates))
            return stored

        try:
            version, uri = await self._with_retry("store model", round_id, store_once)
        except PropellerError as exc:
            await self._fail(round_id, f"storing the new model failed: {exc}")
            return
        metrics = R.weighted_metrics(update_headers(updates))
        async with self._lock(round_id):
            rnd = R.complete(await self.get(round_id), version, uri, metrics, self.clock())
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
            await self.store.put(rnd, notice)
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
        await self._deliver(notice)

    # ---- the outbox ----------------------------------------------------------------------

    async def _deliver(self, notice: Notice) -> bool:
        """Publish `notice` and mark it sent; False (and `run_outbox` tries again later) when
        the publish failed. A crash between the publish and the mark sends it again after the
        restart: subscribers may see a notification twice."""
        if notice.round_id in self._publishing:
            return True  # being published right now
        self._publishing.add(notice.round_id)
        try:
            await self.publish(notice.topic, notice.payload)
            await self.store.sent(notice.round_id)
        except Exception as exc:
            log.warning(
                "[Coordinator.outbox] round_id=%s notification not published yet: %s; "
                "retrying later",
                notice.round_id,
                exc,
            )
            self._outbox_due.set()
            return False
        finally:
            self._publishing.discard(notice.round_id)
        return True

    async def deliver_unsent(self) -> bool:
        """Publish every notice the store holds unsent; True if all went out."""
        unsent = await self.store.unsent()
        if unsent:
            log.info("[Coordinator.outbox] %d unsent notification(s) to publish", len(unsent))
        delivered = [await self._deliver(notice) for notice in unsent]
        return all(delivered)

    async def run_outbox(self, retry_s: float) -> None:
        """Forever: publish what the outbox holds unsent, at start (what a crash left) and
        after a failed publish, every `retry_s` seconds until it goes out. Cancel to stop."""
        while True:
            await self._outbox_due.wait()
            self._outbox_due.clear()
            try:
                done = await self.deliver_unsent()
            except Exception:
                log.exception("[Coordinator.outbox] reading the outbox failed")
                done = False
            if not done:
                await asyncio.sleep(retry_s)
                self._outbox_due.set()

    async def _with_retry(
        self, what: str, round_id: str, attempt_fn: Callable[[int], Awaitable[T]]
    ) -> T:
        attempts = max(1, self.retry.attempts)
        for attempt in range(1, attempts + 1):
            try:
                return await attempt_fn(attempt)
            except _PERMANENT:
                raise
            except PropellerError as exc:
                if attempt == attempts:
                    raise type(exc)(f"{what}: {attempts} attempts, last: {exc}") from exc
                delay = self.retry.backoff_s(attempt)
                log.warning(
                    "[Coordinator.aggregate] round_id=%s %s attempt %d/%d failed: %s; "
                    "retrying in %.2fs",
                    round_id,
                    what,
                    attempt,
                    attempts,
                    exc,
                    delay,
                )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _fail(self, round_id: str, reason: str) -> None:
        async with self._lock(round_id):
            rnd = R.fail(await self.get(round_id), reason, self.clock())
            await self.store.put(rnd)
            self._emit(EventType.FAILED, rnd)
        log.error("[Coordinator.aggregate] round_id=%s failed: %s", round_id, reason)

    # ---- events ------------------------------------------------------------------------

    def _emit(self, kind: EventType, rnd: Round, proplet_id: str = "") -> None:
        if rnd.state is not R.RoundState.OPEN:
            self._members.pop(rnd.round_id, None)  # closed: no more updates to look up
        event = Event(kind, rnd, self.clock(), proplet_id)
        for queue in self._watchers.get(rnd.round_id, ()):
            queue.put_nowait(event)

    async def watch(self, round_id: str) -> AsyncIterator[Event]:
        """A SNAPSHOT of the round, then one event per change, ending after COMPLETED or
        FAILED (at once when the round already finished)."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        await self.get(round_id)  # NOT_FOUND before a lock exists for an unknown id
        async with self._lock(round_id):
            rnd = await self.get(round_id)
            if not rnd.finished:
                self._watchers.setdefault(round_id, set()).add(queue)
        try:
            yield Event(EventType.SNAPSHOT, rnd, self.clock())
            if rnd.finished:
                return
            while True:
                event = await queue.get()
                yield event
                if event.round.finished:  # COMPLETED or FAILED: nothing follows
                    return
        finally:
            watchers = self._watchers.get(round_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[round_id]

    # ---- lifecycle ---------------------------------------------------------------------

    async def wait_finishing(self) -> None:
        """Wait for the aggregations in flight (tests, graceful shutdown)."""
        while self._finishing:
            await asyncio.gather(*self._finishing.values(), return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel the aggregations in flight; their rounds stay AGGREGATING for `resume`."""
        tasks = list(self._finishing.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _digest(specs: Sequence[Spec], tensors: Tensors) -> str:
    """The sha256 of an update's bytes in the base model's tensor order ("" when it lacks a
    tensor: its checks refuse it)."""
    if any(s.name not in tensors for s in specs):
        return ""
    return sha256_of({s.name: tensors[s.name] for s in specs})


class ClippedUpdates:
    """A round's updates as they are aggregated: each one that clipping scaled
    (`Update.clip_scale` < 1) is `bounds.scaled` towards the base model; the others as sent.
    Iterated afresh by every aggregation attempt."""

    def __init__(self, updates: RoundUpdates, base: Tensors) -> None:
        self.updates = updates
        self.base = base

    @property
    def headers(self) -> Sequence[Update]:
        return update_headers(self.updates)

    async def __aiter__(self) -> AsyncIterator[Update]:
        async for u in each_update(self.updates):
            if u.clip_scale != 1.0:
                tensors = await offload_if_big(
                    nbytes_of(u.tensors), B.scaled, u.tensors, self.base, u.clip_scale
                )
                u = replace(u, tensors=tensors)
            yield u
            del u


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
