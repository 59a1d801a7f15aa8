"""The console's board: what two sources say of one round is merged (a field one does not
know keeps the other's; a state never goes back), only real changes reach the pages, and a
page that falls behind is told to start again instead of holding changes without bound."""

from __future__ import annotations

import pytest

from propeller.v1 import coordinator_pb2
from server.console import board as board_module
from server.console.board import Board, Change
from server.console.feeds import round_event_fields

pytestmark = pytest.mark.unit


async def test_a_round_merges_both_sources_and_never_goes_back() -> None:
    board = Board()
    async with board.page() as (snapshot, changes):
        assert snapshot == {"proplets": [], "experiments": [], "rounds": [], "problem": ""}
        # The coordinator's stream says it closed (with when) ...
        event = coordinator_pb2.RoundEvent(
            type=coordinator_pb2.ROUND_EVENT_TYPE_AGGREGATING,
            timestamp=1000.5,
            status=coordinator_pb2.RoundStatus(
                round_id="r1",
                experiment_id="e",
                state=coordinator_pb2.ROUND_STATE_AGGREGATING,
                started_at=1000.0,
                k_of_n=2,
                num_updates=2,
                closed_by="k_of_n",
                metrics={"loss": 0.5},
            ),
        )
        board.round("r1", round_event_fields(event))
        # ... then a late snapshot from the manager still says OPEN and knows no times.
        board.round("r1", {"state": "OPEN", "index": 1, "started_at": None, "eval": {"loss": 0.4}})
        first, second = changes.get_nowait(), changes.get_nowait()
        assert first is not None and second is not None
        r = second.data
        assert (r["state"], r["index"], r["started_at"], r["closed_at"]) == (
            "AGGREGATING",
            1,
            1000.0,
            1000.5,
        )
        assert (r["train"], r["eval"], r["closed_by"]) == ({"loss": 0.5}, {"loss": 0.4}, "k_of_n")
        # The end moves it on; telling the same again changes nothing, so no page hears it.
        board.round("r1", {"state": "COMPLETED", "completed_at": 1001.0})
        board.round("r1", {"state": "COMPLETED", "completed_at": 1001.0})
        board.proplets([{"id": "p", "alive": True}])
        board.proplets([{"id": "p", "alive": True}])
        kinds = [changes.get_nowait() for _ in range(changes.qsize())]
        assert [
            (c.kind, c.data.get("state") if c.kind == "round" else c.data) for c in kinds if c
        ] == [
            ("round", "COMPLETED"),
            ("proplets", [{"id": "p", "alive": True}]),
        ]
    assert board.pages == 0


async def test_a_page_that_falls_behind_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(board_module, "PAGE_QUEUE", 3)
    board = Board()
    async with board.page() as (_, slow), board.page() as (_, keeping_up):
        for i in range(3):
            board.experiment("e", {"current_round": i})
            assert keeping_up.get_nowait() == Change(
                "experiment", board.snapshot()["experiments"][0]
            )
        board.experiment("e", {"current_round": 3})
        # The slow page's queue was full: it is dropped, its last entry says "start again".
        assert board.pages == 1
        left = [slow.get_nowait() for _ in range(slow.qsize())]
        assert left[-1] is None and len(left) == 3
        assert keeping_up.get_nowait() == Change("experiment", board.snapshot()["experiments"][0])
