"""The table / key-value / JSON renderer and small argument parsers of the client commands."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from server.cli.arguments import parse_env_pairs, parse_task_state
from server.cli.progress import ExperimentView, is_live
from server.cli.render import Output, ago, fields, message_dict, render_round, table, timestamp
from server.errors import InvalidArgument
from server.oci import ImageRef
from tests.cli.helpers import terminal_screen


def test_table_aligns_columns_and_marks_empty_cells() -> None:
    text = table(
        ["ID", "NAME", "ALIVE", "TASKS"],
        [["abc", "proplet-1", True, 0], ["a-much-longer-id", "", False, 12]],
    )
    assert text.splitlines() == [
        "ID                NAME       ALIVE  TASKS",
        "abc               proplet-1  yes    0",
        "a-much-longer-id  -          no     12",
    ]
    assert table(["A", "B"], []) == "A  B"
    with pytest.raises(ValueError, match="row has 1 cells"):
        table(["A", "B"], [["x"]])


def test_fields_align_values() -> None:
    assert fields([("round", "r1"), ("k_of_n", 3), ("metric loss", 0.25)]).splitlines() == [
        "round:        r1",
        "k_of_n:       3",
        "metric loss:  0.25",
    ]
    assert fields([]) == ""


def test_times() -> None:
    assert ago(0) == "never"
    assert ago(100.0, now=100.4) == "0.4s ago"
    assert ago(100.0, now=145.0) == "45s ago"
    assert ago(100.0, now=100.0 + 600) == "10m ago"
    assert ago(100.0, now=100.0 + 3 * 3600) == "3h ago"
    assert ago(100.0, now=100.0 + 5 * 86400) == "5d ago"
    assert timestamp(0) == "-"
    assert len(timestamp(1_700_000_000.0)) == len("2023-11-14 22:13:20")


def test_message_dict_keeps_zeros_names_and_integers() -> None:
    st = coordinator_pb2.RoundStatus(round_id="r", state=coordinator_pb2.ROUND_STATE_OPEN)
    st.new_model_version = 0
    d = message_dict(st)
    assert d["round_id"] == "r" and d["state"] == "ROUND_STATE_OPEN"
    assert d["num_updates"] == 0 and d["new_model_version"] == 0 and d["participants"] == []
    big = message_dict(coordinator_pb2.RoundStatus(new_model_version=2**40))
    assert big["new_model_version"] == 2**40


def test_output_writes_json_and_lines() -> None:
    buf = io.StringIO()
    out = Output(buf)
    out.json({"a": 1})
    out.json_line({"b": [1, 2]})
    out.text("plain")
    text = buf.getvalue()
    assert json.loads(text[: text.index("}") + 1]) == {"a": 1}
    assert '{"b":[1,2]}\n' in text and text.endswith("plain\n")


def test_argument_parsers() -> None:
    assert parse_task_state("running") == manager_pb2.TASK_STATE_RUNNING
    assert parse_task_state("TASK_STATE_FAILED") == manager_pb2.TASK_STATE_FAILED
    with pytest.raises(InvalidArgument, match="--state: 'unspecified'"):
        parse_task_state("unspecified")
    assert parse_env_pairs(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(InvalidArgument, match="--env: '=v'"):
        parse_env_pairs(["=v"])
    assert ImageRef.push_target("localhost:5000/fl-client-wasm") == ImageRef(
        "localhost:5000", "fl-client-wasm", "latest"
    )
    assert ImageRef.push_target("oci://reg.example.com/a/b:v1") == ImageRef(
        "reg.example.com", "a/b", "v1"
    )
    with pytest.raises(InvalidArgument, match="names no registry host"):
        ImageRef.push_target("library/hello:1")
    with pytest.raises(InvalidArgument, match="not an OCI reference"):
        ImageRef.push_target("localhost:5000/Bad Name")


def _round(index: int, **fields: Any) -> manager_pb2.ExperimentRound:
    return manager_pb2.ExperimentRound(
        index=index, round_id=f"exp-r{index}", sampled=[f"p{i}" for i in range(4)], **fields
    )


def _exp_event(kind: Any, rnd: manager_pb2.ExperimentRound | None = None) -> Any:
    return manager_pb2.ExperimentEvent(
        type=kind,
        experiment=manager_pb2.Experiment(config=manager_pb2.StartExperimentRequest(rounds=2)),
        round=rnd,
    )


def test_the_experiment_view_redraws_the_rounds_table_and_the_round_in_flights_bar() -> None:
    E = manager_pb2
    out = io.StringIO()
    view = ExperimentView(out, 1)
    view.on_experiment_event(_exp_event(E.EXPERIMENT_EVENT_TYPE_SNAPSHOT))
    view.on_experiment_event(_exp_event(E.EXPERIMENT_EVENT_TYPE_ROUND_STARTED, _round(1)))
    status = coordinator_pb2.RoundStatus(k_of_n=4, reported=["p0", "p2"])
    view.on_round_event("exp-r1", coordinator_pb2.RoundEvent(status=status))
    view.on_round_event("exp-r0", coordinator_pb2.RoundEvent(status=status))  # not in flight
    screen = terminal_screen(out.getvalue())
    assert screen[0].split()[:3] == ["ROUND", "ROUND", "ID"]
    assert screen[1].split()[:2] == ["1", "exp-r1"]
    assert re.fullmatch(r"round 1/2 exp-r1  \[##--\] 2/4 updates  \d+\.\ds", screen[2])
    assert len(screen) == 3
    done = _round(
        1, state=coordinator_pb2.ROUND_STATE_COMPLETED, new_model_version=1, reported=["p0"] * 4
    )
    view.on_experiment_event(_exp_event(E.EXPERIMENT_EVENT_TYPE_ROUND_FINISHED, done))
    view.on_experiment_event(_exp_event(E.EXPERIMENT_EVENT_TYPE_ROUND_STARTED, _round(2)))
    screen = terminal_screen(out.getvalue())
    # Round 1 in the table as it ended, round 2 started, its bar empty: the table updated.
    assert screen[1].split()[:6] == ["1", "exp-r1", "COMPLETED", "v1", "4", "4"]
    assert screen[2].split()[:2] == ["2", "exp-r2"]
    assert screen[3].startswith("round 2/2 exp-r2  [----] 0/4 updates")
    view.on_experiment_event(_exp_event(E.EXPERIMENT_EVENT_TYPE_ENDED))
    assert len(terminal_screen(out.getvalue())) == 3  # the table alone once it ended


def test_off_a_terminal_the_watch_is_plain_lines() -> None:
    assert not is_live(io.StringIO(), io.StringIO())


def test_a_rounds_fuel_is_rendered_when_it_has_some() -> None:
    text = render_round(
        coordinator_pb2.RoundStatus(
            round_id="r1", fuel_budget=10**9, min_fuel_ratio=0.5, fuel_consumed=1234567
        )
    )
    assert "1,000,000,000 a run" in text
    assert "0.5" in text.split("min fuel ratio", 1)[1].splitlines()[0]
    assert "1,234,567 (the accepted updates', summed)" in text
    assert "fuel" not in render_round(coordinator_pb2.RoundStatus(round_id="r1"))
