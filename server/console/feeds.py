"""What keeps the console's `Board` current, as a gRPC client of the services (the CLI's
`Client`): every `poll_s`, ListProplets (liveness has no stream) and ListExperiments (there is
no stream of new experiments); for each experiment first seen, its rounds' coordinator status
once (ListRounds: their times); for each running experiment, WatchExperiment; for each round
that starts or is open, WatchRound (its updates as they are accepted, and when it closed:
RoundStatus has no close time, the AGGREGATING event's timestamp is it).

A watch that fails is logged and forgotten, so the next poll starts it again while its
experiment or round still runs; a poll that fails shows on the page as the console's problem.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

from propeller.v1 import coordinator_pb2, manager_pb2
from server.cli.client import Client
from server.cli.render import describe_error
from server.console.board import Board, Entry
from server.errors import PropellerError
from server.lifecycle import Lifecycle, cancel_and_wait, start_task

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 2.0
# A watch lasts at most this long before it is started again (the services bound nothing of
# ours, but a stream without end would hide a stalled one).
WATCH_S = 3600.0
_OPEN = ("PENDING", "OPEN", "AGGREGATING")


def _round_state(value: int) -> str:
    return coordinator_pb2.RoundState.Name(value).removeprefix("ROUND_STATE_")


def _time(value: float) -> float | None:
    """Unix seconds, None for the protos' 0 = not yet."""
    return value or None


def proplet_entry(p: manager_pb2.Proplet) -> Entry:
    return {
        "id": p.id,
        "name": p.name,
        "alive": p.alive,
        "last_seen": _time(p.last_seen),
        "task_count": p.task_count,
    }


def experiment_fields(e: manager_pb2.Experiment) -> dict[str, Any]:
    ended = e.HasField("end") and e.end.reason != manager_pb2.END_REASON_UNSPECIFIED
    return {
        "state": manager_pb2.ExperimentState.Name(e.state).removeprefix("EXPERIMENT_STATE_"),
        "current_round": e.current_round,
        "rounds_planned": e.config.rounds,
        "created_at": _time(e.created_at),
        "end_reason": (
            manager_pb2.EndReason.Name(e.end.reason).removeprefix("END_REASON_") if ended else ""
        ),
        "end_detail": e.end.detail if ended else "",
        "ended_at": _time(e.end.ended_at) if ended else None,
    }


def experiment_round_fields(experiment_id: str, r: manager_pb2.ExperimentRound) -> dict[str, Any]:
    """What the manager knows of a round: its place in the experiment and its metrics. The
    times are the coordinator's (`status_fields`)."""
    return {
        "experiment_id": experiment_id,
        "index": r.index,
        "state": _round_state(r.state),
        "participants": list(r.sampled) or None,
        "reported": list(r.reported) or None,
        "closed_by": r.closed_by or None,
        "failure_reason": r.failure_reason or None,
        "new_model_version": r.new_model_version or None,
        "train": dict(r.train_metrics),
        "eval": dict(r.eval_metrics),
    }


def status_fields(s: coordinator_pb2.RoundStatus) -> dict[str, Any]:
    """What the coordinator knows of a round: its progress and its times."""
    return {
        "experiment_id": s.experiment_id or None,
        "state": _round_state(s.state),
        "k_of_n": s.k_of_n,
        "num_updates": s.num_updates,
        "participants": list(s.participants),
        "reported": list(s.reported),
        "closed_by": s.closed_by or None,
        "failure_reason": s.failure_reason or None,
        "started_at": _time(s.started_at),
        "completed_at": _time(s.completed_at),
        "new_model_version": s.new_model_version or None,
        # Sample-weighted training metrics (the same numbers as the manager's train_metrics).
        "train": dict(s.metrics),
    }


def round_event_fields(event: coordinator_pb2.RoundEvent) -> dict[str, Any]:
    fields = status_fields(event.status)
    closing = (
        coordinator_pb2.ROUND_EVENT_TYPE_AGGREGATING,
        coordinator_pb2.ROUND_EVENT_TYPE_FAILED,
    )
    if event.type in closing and event.timestamp:
        fields["closed_at"] = event.timestamp
    return fields


class Feeds(Lifecycle):
    """The polls and watches feeding `board` through `client`, from entry to exit."""

    def __init__(self, client: Client, board: Board, poll_s: float = DEFAULT_POLL_S) -> None:
        self._client = client
        self._board = board
        self._poll_s = poll_s
        self._known: set[str] = set()
        # Experiments seen ended whose rounds were read once from the manager afterwards.
        self._settled: set[str] = set()
        self._watches: dict[str, asyncio.Task[None]] = {}

    async def _open(self, stack: AsyncExitStack) -> None:
        stack.push_async_callback(self._stop_watches)
        start_task(stack, self._poll(), "console-poll")

    async def _stop_watches(self) -> None:
        watches, self._watches = list(self._watches.values()), {}
        for task in watches:
            await cancel_and_wait(task)

    async def _poll(self) -> None:
        while True:
            try:
                await self.poll_once()
                self._board.problem("")
            except PropellerError as exc:
                # As the CLI says it: "PERMISSION_DENIED: ...", "UNAVAILABLE: cannot reach ...".
                problem = describe_error(exc)
                if self._board.problem(problem):  # once per problem, not every poll
                    log.warning("[console] poll: %s", problem)
            await asyncio.sleep(self._poll_s)

    async def poll_once(self) -> None:
        """One look at the proplets and the experiments; starts what must be watched."""
        listed = await self._client.list_proplets()
        self._board.proplets([proplet_entry(p) for p in listed.proplets])
        experiments = await self._client.list_experiments()
        for e in experiments.experiments:
            self._board.experiment(e.experiment_id, experiment_fields(e))
            for r in e.rounds:
                self._board.round(r.round_id, experiment_round_fields(e.experiment_id, r))
            if e.experiment_id not in self._known:
                # Its rounds' times, once: the coordinator's status of each (one paged call).
                rounds = await self._client.list_rounds(e.experiment_id)
                for s in rounds.rounds:
                    self._board.round(s.round_id, status_fields(s))
                self._known.add(e.experiment_id)
            if e.state == manager_pb2.EXPERIMENT_STATE_RUNNING:
                self._watch(
                    f"experiment:{e.experiment_id}",
                    functools.partial(self._experiment, e.experiment_id),
                )
            elif e.experiment_id not in self._settled:
                # Ended (perhaps between two polls, never watched: ListExperiments carries no
                # rounds): its rounds' places and metrics from the manager, once.
                ended = await self._client.experiment_rounds(e.experiment_id)
                for r in ended.rounds:
                    self._board.round(r.round_id, experiment_round_fields(e.experiment_id, r))
                self._settled.add(e.experiment_id)
            for r in e.rounds:
                self._watch_round_if_open(r.round_id)

    def _watch_round_if_open(self, round_id: str) -> None:
        entry = self._board.round_of(round_id)
        if entry is not None and entry.get("state") in _OPEN:
            self._watch(f"round:{round_id}", functools.partial(self._round, round_id))

    def _watch(self, key: str, watch: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `watch()` unless the same `key` is being watched already."""
        if key not in self._watches:
            task = asyncio.create_task(self._watching(key, watch), name=f"console-{key}")
            self._watches[key] = task

    async def _watching(self, key: str, watch: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await watch()
        except PropellerError as exc:
            log.info("[console] %s: %s (started again at the next poll)", key, exc)
        finally:
            self._watches.pop(key, None)

    async def _experiment(self, experiment_id: str) -> None:
        async for event in self._client.watch_experiment(experiment_id, WATCH_S):
            self._board.experiment(experiment_id, experiment_fields(event.experiment))
            rounds = list(event.experiment.rounds)
            if event.HasField("round"):
                rounds.append(event.round)
            for r in rounds:
                self._board.round(r.round_id, experiment_round_fields(experiment_id, r))
                if event.type == manager_pb2.EXPERIMENT_EVENT_TYPE_ROUND_STARTED:
                    self._watch(f"round:{r.round_id}", functools.partial(self._round, r.round_id))
                else:
                    self._watch_round_if_open(r.round_id)

    async def _round(self, round_id: str) -> None:
        async for event in self._client.watch_round(round_id, WATCH_S):
            self._board.round(round_id, round_event_fields(event))
