"""The table / key-value / JSON renderer and small argument parsers of the client commands."""

from __future__ import annotations

import io
import json

import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from server.cli.commands import parse_env_pairs, parse_task_state
from server.cli.render import Output, ago, fields, message_dict, table, timestamp
from server.errors import InvalidArgument
from server.oci import ImageRef


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
