"""The one id and name rule (`server.ids`) and the MQTT payloads that follow it."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import InvalidArgument
from server.ids import (
    ID_PATTERN,
    MAX_ENTRIES,
    MAX_ID_LENGTH,
    MAX_NAME_LENGTH,
    MAX_TEXT_BYTES,
    MAX_VALUE_BYTES,
    NAME_PATTERN,
    bounded_text,
    check_id,
    check_ids,
    check_name,
    check_text,
    check_text_map,
    valid_id,
    valid_name,
)
from server.messages import COMPLETED, PropletAnnounce, TaskResult, TaskStart, TaskStop

GOOD_IDS = [
    # A UUID4 as a proplet's id; fixed, so that every run (and each worker of a parallel
    # run) collects the same tests.
    "5ae7121d-6df1-4469-b0fc-ae0f86063b04",
    "demo-r1",
    "exp-r1",
    "p-good",
    "0",
    "a.b_c-d",
    "r" * MAX_ID_LENGTH,
]
# MQTT wildcards and topic levels, NUL, whitespace, the ':' of service user names, a leading
# separator, non-ASCII look-alikes, too long.
BAD_IDS = [
    "",
    "+",
    "#",
    "a/b",
    "p+",
    "p#",
    "a\x00b",
    "a b",
    "a\tb",
    "a\n",
    "service:manager",
    "-p",
    ".p",
    "_p",
    "p\u200b",
    "\uff501",
    "pé",
    "r" * (MAX_ID_LENGTH + 1),
]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_ids_that_pass(value: str) -> None:
    assert valid_id(value) and valid_name(value)
    assert check_id(value, "round_id") == value


@pytest.mark.parametrize("value", BAD_IDS)
def test_ids_refused_with_the_field_named(value: str) -> None:
    assert not valid_id(value)
    with pytest.raises(InvalidArgument, match=r"^round_id: "):
        check_id(value, "round_id")


def test_a_refused_huge_id_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidArgument) as exc:
        check_id("x" * (1 << 20), "proplet_id")
    assert len(str(exc.value)) < 300
    assert f"longer than {MAX_ID_LENGTH} characters" in str(exc.value)


def test_names_are_longer_ids() -> None:
    round_task = f"fl-round-{'r' * MAX_ID_LENGTH}-{'p' * MAX_ID_LENGTH}"
    assert valid_name(round_task) and len(round_task) <= MAX_NAME_LENGTH
    assert check_name("n" * MAX_NAME_LENGTH, "name")
    with pytest.raises(InvalidArgument, match=r"^name: .*longer than 320"):
        check_name("n" * (MAX_NAME_LENGTH + 1), "name")
    with pytest.raises(InvalidArgument, match=r"^name: .*'/'"):
        check_name("a/b", "name")


def test_optional_ids_may_be_empty_only() -> None:
    assert check_id("", "proplet_id", optional=True) == ""
    with pytest.raises(InvalidArgument, match=r"^proplet_id: "):
        check_id("#", "proplet_id", optional=True)


def test_lists_name_the_entry_and_are_counted() -> None:
    with pytest.raises(InvalidArgument, match=r"^participants\[2\]: "):
        check_ids(["a", "b", "c d"], "participants", 10)
    with pytest.raises(InvalidArgument, match=r"^participants: 11 entries, at most 10"):
        check_ids([f"p{i}" for i in range(11)], "participants", 10)


def test_free_text_is_bounded_in_bytes() -> None:
    assert check_text("é" * (MAX_VALUE_BYTES // 2), "image_url")
    with pytest.raises(InvalidArgument, match=r"^image_url: 4098 bytes, at most 4096"):
        check_text("é" * (MAX_VALUE_BYTES // 2 + 1), "image_url")
    with pytest.raises(InvalidArgument, match=r"^image_url: contains a NUL"):
        check_text("a\x00", "image_url")


def test_text_maps_are_bounded() -> None:
    check_text_map({"HYPERPARAMS": '{"epochs": 1}', "_X": "1"}, "env")
    with pytest.raises(InvalidArgument, match=r"^env: 257 entries, at most 256"):
        check_text_map({f"K{i}": "" for i in range(MAX_ENTRIES + 1)}, "env")
    with pytest.raises(InvalidArgument, match=r"^env: keys must not be empty"):
        check_text_map({"": "x"}, "env")
    with pytest.raises(InvalidArgument, match=r"^env: key 'A=B'"):
        check_text_map({"A=B": "x"}, "env")
    with pytest.raises(InvalidArgument, match=r"^env\[A\]: 5000 bytes"):
        check_text_map({"A": "x" * 5000}, "env")


def test_bounded_text_keeps_a_head_and_says_so() -> None:
    assert bounded_text("short") == "short"
    cut = bounded_text("x" * (MAX_TEXT_BYTES + 10))
    assert cut.startswith("x" * 1000) and cut.endswith("truncated]")
    assert len(cut.encode()) < MAX_TEXT_BYTES + 100
    assert bounded_text("a\udcffb") == "a?b"


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=140))
def test_the_patterns_say_what_the_functions_do(value: str) -> None:
    assert bool(re.fullmatch(ID_PATTERN, value, re.ASCII)) == valid_id(value)
    assert bool(re.fullmatch(NAME_PATTERN, value, re.ASCII)) == valid_name(value)


@given(st.from_regex(ID_PATTERN, fullmatch=True))
def test_every_id_the_pattern_describes_passes(value: str) -> None:
    assert valid_id(value)


# --- MQTT payloads: a bad id makes the payload malformed (the manager drops and logs it) ---


@pytest.mark.parametrize("bad", ["p/x", "p+", "#", "a b", "x" * (MAX_ID_LENGTH + 1)])
def test_payloads_with_bad_ids_are_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^proplet_id: "):
        PropletAnnounce.from_json(PropletAnnounce(bad).to_json())
    with pytest.raises(ValueError, match=r"^task_id: "):
        TaskResult.from_json(TaskResult(bad, "p1", COMPLETED).to_json())
    with pytest.raises(ValueError, match=r"^proplet_id: "):
        TaskResult.from_json(TaskResult("t1", bad, COMPLETED).to_json())
    with pytest.raises(ValueError, match=r"^id: "):
        TaskStart.from_json(TaskStart(id=bad, name="n").to_json())
    with pytest.raises(ValueError, match=r"^proplet_id: "):
        TaskStop.from_json(TaskStop(id="t1", proplet_id=bad).to_json())


def test_payload_maps_and_lists_are_bounded() -> None:
    many = {f"k{i}": "v" for i in range(MAX_ENTRIES + 1)}
    with pytest.raises(ValueError, match=r"^metadata: "):
        PropletAnnounce.from_json(json.dumps({"proplet_id": "p1", "metadata": many}))
    with pytest.raises(ValueError, match=r"^env: "):
        TaskStart.from_json(json.dumps({"id": "t1", "env": many}))
    with pytest.raises(ValueError, match=r"^cli_args"):
        TaskStart.from_json(json.dumps({"id": "t1", "cli_args": ["x" * 5000]}))
    with pytest.raises(ValueError, match=r"^name: "):
        PropletAnnounce.from_json(json.dumps({"proplet_id": "p1", "name": "n" * 5000}))


def test_long_results_are_cut_not_dropped() -> None:
    sent = TaskResult("t1", "p1", COMPLETED, results="r" * (2 * MAX_TEXT_BYTES), error="e")
    got = TaskResult.from_json(sent.to_json())
    assert got.state == COMPLETED and got.error == "e"
    assert got.results.startswith("r" * 1000) and got.results.endswith("truncated]")
    assert len(got.results.encode()) < MAX_TEXT_BYTES + 100
