"""Pages of every List RPC: `page_size` and `page_token` in the request, `next_page_token` in
the answer (the shape of Google's AIP-158), for the servers and for the clients that want
everything (`all_pages`).

A page holds at most `page_size` entries (0 = `DEFAULT_PAGE_SIZE`; more than `MAX_PAGE_SIZE`
is taken as `MAX_PAGE_SIZE`) and stops early once its entries reach `PAGE_BYTES` serialized,
so an answer stays within a default gRPC client's 4 MB message limit whatever is stored; a
single entry bigger than that (every entry is bounded by `server.ids`, far below the servers'
64 MiB limit) goes alone on its page. `next_page_token` is empty on the last page.

The token is opaque to clients: it names the list and the key of the last entry sent, and the
next page starts after that key. Every list is ordered by a key that never changes: its
position in creation order for lists that only grow at the end (rounds, proplets, tasks,
experiments), the version for models and the proplet id for datasets. So a client paging
through a list that grows meanwhile sees every entry that was there when it started exactly
once, whatever filter it gives. A token of another list, or no token this server wrote, is
INVALID_ARGUMENT naming `page_token`.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import Message

from server.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Serialized entries per page: below the 4 MB a gRPC client accepts by default (grpcurl's too).
PAGE_BYTES = 3 << 20

Key = int | str
T = TypeVar("T")
M = TypeVar("M", bound=Message)
R = TypeVar("R")


class PagedRequest(Protocol):
    """Any List request message (its fields are plain attributes)."""

    page_size: int
    page_token: str


@dataclass(frozen=True)
class PageRequest:
    """What one List call asks for: up to `size` entries of `listing` after the key `after`
    (None: from the start)."""

    listing: str
    size: int
    after: Key | None = None

    @classmethod
    def of(cls, request: PagedRequest, listing: str, key: type[int] | type[str]) -> PageRequest:
        """The page `request` asks for from the list `listing` ("ListRounds"), whose keys are
        of type `key`; INVALID_ARGUMENT naming the field otherwise."""
        if request.page_size < 0:
            raise InvalidArgument(f"page_size: {request.page_size} must be >= 0 (0 = the default)")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if not request.page_token:
            return cls(listing, size)
        return cls(listing, size, _decode(request.page_token, listing, key))

    def token(self, last: Key) -> str:
        """The page token that continues after the entry whose key is `last`."""
        text = json.dumps([self.listing, last], separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    def indexed(self, entries: Sequence[T]) -> Iterator[tuple[int, T]]:
        """`entries` (a list that only grows at its end) keyed by position, after the token."""
        start = 0 if self.after is None else int(self.after) + 1
        for i in range(start, len(entries)):
            yield i, entries[i]

    def keyed(self, entries: Sequence[T], key: Callable[[T], Key]) -> Iterator[tuple[Key, T]]:
        """`entries` (sorted by `key`, ascending and unique) after the token."""
        start = 0
        if self.after is not None:
            start = bisect.bisect_right(entries, self.after, key=key)
        for i in range(start, len(entries)):
            yield key(entries[i]), entries[i]


def _decode(token: str, listing: str, key: type[int] | type[str]) -> Key:
    bad = InvalidArgument(f"page_token: not a page token of {listing} from this server")
    try:
        padded = token + "=" * (-len(token) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        raise bad from None
    if not (isinstance(value, list) and len(value) == 2 and value[0] == listing):
        raise bad
    after = value[1]
    if key is int and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
        raise bad
    if key is str and not isinstance(after, str):
        raise bad
    return after  # type: ignore[no-any-return]


class Page(Generic[M]):
    """A page being filled: `offer` entries in key order until it says the page is full."""

    def __init__(self, request: PageRequest) -> None:
        self.request = request
        self.items: list[M] = []
        self._bytes = 0
        self._last: Key | None = None
        self._more = False

    def offer(self, key: Key, message: M) -> bool:
        """Add `message` (the entry with key `key`), unless the page is full: then False, the
        entry is left for the next page and the page ends with a `next_page_token`."""
        size = message.ByteSize() + 8  # with its field tag and length
        full = len(self.items) >= self.request.size or (
            bool(self.items) and self._bytes + size > PAGE_BYTES
        )
        if full:
            self._more = True
            return False
        self.items.append(message)
        self._bytes += size
        self._last = key
        return True

    @property
    def next_page_token(self) -> str:
        if not self._more or self._last is None:
            return ""
        return self.request.token(self._last)


def page_of(
    entries: Iterable[tuple[Key, T]],
    request: PageRequest,
    to_proto: Callable[[T], M],
    keep: Callable[[T], bool] | None = None,
) -> Page[M]:
    """The page of `entries` (key order, starting after the token: `PageRequest.indexed` /
    `keyed`) that `request` asks for: those `keep` accepts, as messages."""
    page: Page[M] = Page(request)
    for key, entry in entries:
        if (keep is None or keep(entry)) and not page.offer(key, to_proto(entry)):
            break
    return page


def page_in_order(
    request: PagedRequest,
    listing: str,
    entries: Sequence[T],
    to_proto: Callable[[T], M],
    keep: Callable[[T], bool] | None = None,
) -> Page[M]:
    """The page `request` asks for of `entries`, a list that only grows at its end (creation
    order; keys are positions, so neither a filter nor a change to an entry can shift a
    page): those `keep` accepts, as messages."""
    wanted = PageRequest.of(request, listing, int)
    return page_of(wanted.indexed(entries), wanted, to_proto, keep)


async def all_pages(
    call: Callable[[Any], Awaitable[R]], request: Any, items: Callable[[R], Iterable[T]]
) -> AsyncIterator[T]:
    """Every entry of a List RPC, page after page: `call(request)` (a stub's method with its
    timeout bound), `items(response)` the entries of one answer. `request` is not changed."""
    page = type(request)()
    page.CopyFrom(request)
    while True:
        response = await call(page)
        for item in items(response):
            yield item
        token = response.next_page_token  # type: ignore[attr-defined]
        if not token or token == page.page_token:  # the end (or a server going in circles)
            return
        page.page_token = token
