"""Following a round or an experiment a command started, until it ends (`--watch`): its
events as lines or a live view, and the command's `Reply` (a failure line when it failed)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from propeller.v1 import coordinator_pb2, manager_pb2
from server.cli.client import Client
from server.cli.progress import ExperimentView, is_live
from server.cli.render import (
    Output,
    end_text,
    event_line,
    experiment_event_line,
    experiment_state,
    message_dict,
)
from server.cli.runner import Reply
from server.errors import Unavailable

FINAL_ROUND_STATES = (coordinator_pb2.ROUND_STATE_COMPLETED, coordinator_pb2.ROUND_STATE_FAILED)
FINAL_EVENTS = (
    coordinator_pb2.ROUND_EVENT_TYPE_COMPLETED,
    coordinator_pb2.ROUND_EVENT_TYPE_FAILED,
)


async def follow_round(client: Client, round_id: str, args: argparse.Namespace) -> Reply:
    """Print the round's events live until it closes; a failure if it FAILED."""
    out = Output()
    final: coordinator_pb2.RoundStatus | None = None
    async with contextlib.aclosing(client.watch_round(round_id, args.max_wait)) as events:
        async for ev in events:
            out.json_line(message_dict(ev)) if args.json else out.text(event_line(ev))
            if ev.type in FINAL_EVENTS or (
                ev.type == coordinator_pb2.ROUND_EVENT_TYPE_SNAPSHOT
                and ev.status.state in FINAL_ROUND_STATES
            ):
                final = ev.status
                break
    if final is None:
        raise Unavailable(f"coordinator: the watch of round {round_id} ended before it closed")
    if final.state == coordinator_pb2.ROUND_STATE_FAILED:
        reason = final.failure_reason or "no reason given"
        return Reply(printed=True, failure=f"round {round_id} FAILED: {reason}")
    return Reply(printed=True)


async def follow_experiment(client: Client, experiment_id: str, a: argparse.Namespace) -> Reply:
    """Print the experiment's events live, a line each, until it ends; a failure unless it
    COMPLETED or was STOPPED."""
    out = Output()
    final: manager_pb2.Experiment | None = None
    # On a terminal: the rounds' table and the round in flight's bar, redrawn in place.
    view = ExperimentView(out.stream, 1) if not a.json and is_live(out.stream, sys.stderr) else None
    round_watch: asyncio.Task[None] | None = None

    async def follow_round(round_id: str) -> None:
        assert view is not None
        events = client.watch_round(round_id, a.max_wait)
        async with contextlib.aclosing(events):
            async for ev in events:
                view.on_round_event(round_id, ev)

    events = client.watch_experiment(experiment_id, a.max_wait)
    try:
        async with contextlib.aclosing(events):
            async for ev in events:
                if a.json:
                    out.json_line(message_dict(ev))
                elif view is None:
                    out.text(experiment_event_line(ev))
                else:
                    watched = view.round_in_flight
                    view.on_experiment_event(ev)
                    if view.round_in_flight and view.round_in_flight != watched:
                        if round_watch is not None:
                            round_watch.cancel()
                        round_watch = asyncio.create_task(follow_round(view.round_in_flight))
                ended = ev.experiment.state != manager_pb2.EXPERIMENT_STATE_RUNNING
                if ev.type == manager_pb2.EXPERIMENT_EVENT_TYPE_ENDED or ended:
                    final = ev.experiment
                    break
    finally:
        if round_watch is not None:
            round_watch.cancel()
            # The bar is only a view: its watch failing or being cut short changes nothing.
            await asyncio.gather(round_watch, return_exceptions=True)
    if view is not None and final is not None:
        out.text(f"{experiment_state(final.state)}  {end_text(final.end)}")
    if final is None:
        raise Unavailable(f"manager: the watch of experiment {experiment_id} ended before it did")
    if final.state == manager_pb2.EXPERIMENT_STATE_FAILED:
        return Reply(
            printed=True, failure=f"experiment {experiment_id} FAILED: {end_text(final.end)}"
        )
    return Reply(printed=True)
