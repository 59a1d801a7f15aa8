"""Pages of the List RPCs (`server.paging`): sizes, tokens, the byte budget, following pages."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest

from propeller.v1 import coordinator_pb2, manager_pb2
from server.errors import InvalidArgument
from server.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    PAGE_BYTES,
    PageRequest,
    all_pages,
    page_of,
)


@dataclass
class Ask:
    page_size: int = 0
    page_token: str = ""


def request(size: int = 0, token: str = "", key: type[int] | type[str] = int) -> PageRequest:
    return PageRequest.of(Ask(size, token), "ListTasks", key)


def task(i: int, results: str = "") -> manager_pb2.Task:
    return manager_pb2.Task(id=f"t{i}", results=results)


def test_sizes_default_and_clamp() -> None:
    assert request().size == DEFAULT_PAGE_SIZE
    assert request(7).size == 7
    assert request(10**9).size == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgument, match=r"^page_size: -1 must be >= 0"):
        request(-1)


def test_pages_cover_everything_once() -> None:
    entries = list(range(250))
    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        wanted = request(40, token)
        page = page_of(wanted.indexed(entries), wanted, task)
        seen += [int(t.id[1:]) for t in page.items]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == entries and pages == 7


def test_the_last_page_has_no_token_even_when_full() -> None:
    wanted = request(5)
    page = page_of(wanted.indexed(list(range(5))), wanted, task)
    assert len(page.items) == 5 and page.next_page_token == ""


def test_a_filter_cannot_shift_pages() -> None:
    entries = list(range(100))
    wanted = request(10)
    first = page_of(wanted.indexed(entries), wanted, task, keep=lambda i: i % 3 == 0)
    assert [t.id for t in first.items] == [f"t{i}" for i in range(0, 30, 3)]
    wanted = request(10, first.next_page_token)
    second = page_of(wanted.indexed(entries), wanted, task, keep=lambda i: i % 3 == 0)
    assert second.items[0].id == "t30"


def test_pages_stop_at_the_byte_budget_but_never_empty() -> None:
    big = "x" * (PAGE_BYTES // 3)
    entries = list(range(10))
    wanted = request(100)
    page = page_of(wanted.indexed(entries), wanted, lambda i: task(i, big))
    assert len(page.items) == 2 and page.next_page_token
    huge = "x" * (2 * PAGE_BYTES)
    page = page_of(wanted.indexed(entries), wanted, lambda i: task(i, huge))
    assert len(page.items) == 1 and page.next_page_token


def test_keyed_lists_resume_after_the_last_key() -> None:
    names = ["a", "b", "d", "e"]
    wanted = PageRequest.of(Ask(2), "ListDatasets", str)
    page = page_of(wanted.keyed(names, str), wanted, lambda n: task(0, n))
    assert [t.results for t in page.items] == ["a", "b"]
    names = ["a", "b", "c", "d", "e"]  # "c" arrived between the two pages
    wanted = PageRequest.of(Ask(2, page.next_page_token), "ListDatasets", str)
    page = page_of(wanted.keyed(names, str), wanted, lambda n: task(0, n))
    assert [t.results for t in page.items] == ["c", "d"]


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "%%%",
        b64("not json"),
        b64('["ListTasks"]'),
        b64('["ListRounds", 3]'),
        b64('["ListTasks", "3"]'),
        b64('["ListTasks", -2]'),
        b64('["ListTasks", true]'),
        b64('{"ListTasks": 3}'),
    ],
)
def test_tokens_this_server_did_not_write_are_refused(token: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^page_token: not a page token of ListTasks"):
        request(10, token)


def test_a_token_names_its_list() -> None:
    token = request(1).token(5)
    assert request(1, token).after == 5
    with pytest.raises(InvalidArgument, match=r"^page_token: "):
        PageRequest.of(Ask(1, token), "ListRounds", int)


async def test_all_pages_follows_the_tokens_without_changing_the_request() -> None:
    rounds = [coordinator_pb2.RoundStatus(round_id=f"r{i}") for i in range(23)]
    asked: list[tuple[str, int, str]] = []

    async def call(r: coordinator_pb2.ListRoundsRequest) -> coordinator_pb2.ListRoundsResponse:
        asked.append((r.experiment_id, r.page_size, r.page_token))
        wanted = PageRequest.of(r, "ListRounds", int)
        page = page_of(wanted.indexed(rounds), wanted, lambda x: x)
        return coordinator_pb2.ListRoundsResponse(
            rounds=page.items, next_page_token=page.next_page_token
        )

    first = coordinator_pb2.ListRoundsRequest(experiment_id="e", page_size=10)
    got = [r.round_id async for r in all_pages(call, first, lambda resp: resp.rounds)]
    assert got == [f"r{i}" for i in range(23)]
    assert [a[:2] for a in asked] == [("e", 10)] * 3 and asked[0][2] == ""
    assert first.page_token == ""
