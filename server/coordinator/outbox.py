"""The coordinator's outbox: publishing the notices its store keeps unsent (a round's
completion is committed together with its notice, `RoundStore.put(rnd, notice)`), marking each
sent once published, and trying again later what did not go out. At least once: a crash
between a publish and its mark publishes the notice again after the restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from server.coordinator.records import Notice
from server.coordinator.store import RoundStore

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]
RoundLock = Callable[[str], AbstractAsyncContextManager[None]]


class Outbox:
    """Publishes `store`'s unsent notices through `publish`. `replicated`: the coordinator's
    round lock when it is one of several replicas on one store, so only one of them publishes
    a notice (None for a single coordinator)."""

    def __init__(self, store: RoundStore, publish: Publish, replicated: RoundLock | None) -> None:
        self.store = store
        self.publish = publish
        self._replicated = replicated
        # Set when the outbox may hold notices to publish: at start (a crash may have left
        # some) and after a publish failed. `run` waits for it.
        self._due = asyncio.Event()
        self._due.set()
        self._publishing: set[str] = set()

    async def deliver(self, notice: Notice) -> bool:
        """Publish `notice` and mark it sent; False (and `run` tries again later) when
        the publish failed. A crash between the publish and the mark sends it again after the
        restart: subscribers may see a notification twice."""
        if notice.round_id in self._publishing:
            return True  # being published right now
        self._publishing.add(notice.round_id)
        try:
            if self._replicated is None:
                await self.publish(notice.topic, notice.payload)
                await self.store.sent(notice.round_id)
            else:
                await self._deliver_once(notice, self._replicated)
        except Exception as exc:
            log.warning(
                "[Coordinator.outbox] round_id=%s notification not published yet: %s; "
                "retrying later",
                notice.round_id,
                exc,
            )
            self._due.set()
            return False
        finally:
            self._publishing.discard(notice.round_id)
        return True

    async def _deliver_once(self, notice: Notice, round_lock: RoundLock) -> None:
        """A replica publishes a notice under the round's lock, and only if it is still
        unsent: two replicas (one completing the round, one starting up and reading the
        outbox) never both publish it, short of a crash between the publish and the mark."""
        async with round_lock(notice.round_id):
            if all(n.round_id != notice.round_id for n in await self.store.unsent()):
                return  # another replica published it
            await self.publish(notice.topic, notice.payload)
            await self.store.sent(notice.round_id)

    async def deliver_unsent(self) -> bool:
        """Publish every notice the store holds unsent; True if all went out."""
        unsent = await self.store.unsent()
        if unsent:
            log.info("[Coordinator.outbox] %d unsent notification(s) to publish", len(unsent))
        delivered = [await self.deliver(notice) for notice in unsent]
        return all(delivered)

    async def run(self, retry_s: float) -> None:
        """Forever: publish what the outbox holds unsent, at start (what a crash left) and
        after a failed publish, every `retry_s` seconds until it goes out. Cancel to stop."""
        while True:
            await self._due.wait()
            self._due.clear()
            try:
                done = await self.deliver_unsent()
            except Exception:
                log.exception("[Coordinator.outbox] reading the outbox failed")
                done = False
            if not done:
                await asyncio.sleep(retry_s)
                self._due.set()
