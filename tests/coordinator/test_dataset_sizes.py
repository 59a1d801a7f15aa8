"""The coordinator's num_samples caps as it asks the data store for them (`DataStoreSizes`):
lookups that arrive together are answered by one GetDatasetInfos call, each with its own
proplet's size or NotFound, and a failed or stopped call fails only the lookups it carried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from server.coordinator.clients import SIZES_PER_CALL, DataStoreSizes
from server.datastore.app import DataStoreApp, DataStoreConfig
from server.errors import NotFound, Unavailable
from server.grpc_server import channel
from tests.services.harness import RPC_TIMEOUT, served
from tests.support.ports import free_port
from tests.support.security import service_tls

SEEDED = tuple(f"p{i}" for i in range(40))


@asynccontextmanager
async def sizes_from_a_data_store() -> AsyncIterator[tuple[DataStoreSizes, DataStoreApp]]:
    config = DataStoreConfig(
        addr="127.0.0.1:0", seed_proplet_ids=SEEDED, tls=service_tls("datastore")
    )
    async with (
        DataStoreApp(config) as app,
        served(app.bindings, service_tls("coordinator")) as ch,
    ):
        sizes = DataStoreSizes(ch, timeout_s=RPC_TIMEOUT)
        try:
            yield sizes, app
        finally:
            await sizes.aclose()


async def size_or_error(sizes: DataStoreSizes, proplet_id: str) -> int | str:
    try:
        return await sizes.size(proplet_id)
    except NotFound as exc:
        return f"NotFound: {exc}"


async def test_lookups_made_together_get_each_their_own_answer() -> None:
    async with sizes_from_a_data_store() as (sizes, app):
        expected = {p: (await app.store.get(p)).size for p in SEEDED}  # type: ignore[union-attr]
        asked = [*SEEDED, "nobody", SEEDED[3], *SEEDED[:5]]
        # More lookups at once than one call names: they go in several.
        asked += [f"x{i}" for i in range(SIZES_PER_CALL)]
        answers = await asyncio.gather(*(size_or_error(sizes, p) for p in asked))
        for proplet_id, answer in zip(asked, answers, strict=True):
            if proplet_id in expected:
                assert answer == expected[proplet_id]
            else:
                assert answer == f"NotFound: proplet_id: no dataset for {proplet_id!r}"
        # One by one, as before.
        assert [await sizes.size(p) for p in SEEDED[:3]] == [expected[p] for p in SEEDED[:3]]


async def test_a_lookup_given_up_on_leaves_the_others_answered() -> None:
    async with sizes_from_a_data_store() as (sizes, _):
        first = asyncio.create_task(sizes.size(SEEDED[0]))
        dropped = asyncio.create_task(sizes.size(SEEDED[1]))
        dropped.cancel()
        assert await sizes.size(SEEDED[2]) > 0
        assert await first > 0
        with pytest.raises(asyncio.CancelledError):
            await dropped


async def test_an_unreachable_data_store_fails_the_lookups_unavailable() -> None:
    async with channel(f"127.0.0.1:{free_port()}", service_tls("coordinator")) as ch:
        sizes = DataStoreSizes(ch, timeout_s=RPC_TIMEOUT)
        try:
            outcomes = await asyncio.gather(
                *(sizes.size(p) for p in SEEDED[:3]), return_exceptions=True
            )
            assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
        finally:
            await sizes.aclose()


async def test_lookups_waiting_when_the_coordinator_stops_fail_unavailable() -> None:
    # A data store that never answers: a listening socket nobody serves.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with channel(f"127.0.0.1:{port}", service_tls("coordinator")) as ch:
            sizes = DataStoreSizes(ch, timeout_s=RPC_TIMEOUT)
            waiting = [asyncio.create_task(sizes.size(p)) for p in SEEDED[:3]]
            await asyncio.sleep(0)  # the lookups are made (one call out, none answered)
            await sizes.aclose()
            outcomes = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
            assert "stopping" in str(outcomes[0])
    finally:
        server.close()
        await server.wait_closed()
