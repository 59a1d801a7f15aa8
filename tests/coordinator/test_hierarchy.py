"""Hierarchical aggregation over real services: a registry and an aggregator, a root
coordinator (tier "root") whose round's participants are sites, two site coordinators (tier
"site", each with its own `site-{id}` service certificate) whose rounds' participants are
proplets, and a flat coordinator on the same registry for the one-level reference. Proplets'
updates are submitted over mutual TLS with their own certificates, signed, as a proplet
sends them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np
import pytest

from propeller.v1 import coordinator_pb2
from server.config import Endpoints, MqttConfig
from server.coordinator.app import CoordinatorApp, CoordinatorConfig
from server.coordinator.rounds import Update
from server.coordinator.site import GrpcUpstream
from server.errors import InvalidArgument, PermissionDenied
from server.grpc_server import channel
from server.pki import load_private_key
from server.tensors import Tensors
from tests.cli.helpers import Cli, flags
from tests.coordinator.helpers import fedavg, make_update
from tests.support.clients import Clients, clients
from tests.support.cluster import LOCAL, round_services, serve_app
from tests.support.security import service_tls

S = coordinator_pb2
V0 = "fl/models/global_model_v0"
# A site round closes before its root's (60 s, the default).
SITE_TIMEOUT_S = 30.0
SITES = {"east": ("a", "b", "c"), "west": ("d", "e")}

UPDATES = {
    "a": make_update("a", [1.0, 2.0, 3.0], 1.0, 10, loss=0.9),
    "b": make_update("b", [0.0, -1.0, 4.0], -2.0, 30, loss=0.3),
    "c": make_update("c", [5.0, 5.0, 5.0], 0.5, 60, loss=0.1),
    "d": make_update("d", [0.25, 0.5, -3.0], 3.0, 7, loss=0.7),
    "e": make_update("e", [-1.5, 2.5, 0.125], 0.75, 23, loss=0.2),
}


@dataclass
class Hierarchy:
    """Clients of the root, of each site and of the flat reference coordinator, and the
    addresses a test needs to start more (a site with other settings)."""

    root: Clients
    sites: dict[str, Clients]
    flat: Clients
    root_addr: str
    services: dict[str, str]
    endpoints: Endpoints
    mqtt: MqttConfig


@contextlib.asynccontextmanager
async def site_coordinator(
    h: Hierarchy | Any, site_id: str, root_addr: str, services: dict[str, str], **settings: Any
) -> AsyncIterator[str]:
    """A site coordinator for `site_id` of the root at `root_addr`, with its own certificate."""
    tls = service_tls(f"site-{site_id}")
    config = CoordinatorConfig(
        addr=LOCAL,
        aggregator_addr=services["aggregator"],
        registry_addr=services["registry"],
        mqtt=h.as_identity(tls) if isinstance(h, MqttConfig) else h.mqtt.as_identity(tls),
        tls=tls,
        tick_s=0.05,
        **{"num_samples_cap": "none", **settings},
        tier="site",
        upstream_addr=root_addr,
        site_id=site_id,
    )
    async with serve_app(CoordinatorApp(config), tls=tls) as addr:
        yield addr


@contextlib.asynccontextmanager
async def hierarchy(mqtt: MqttConfig, **root_settings: Any) -> AsyncIterator[Hierarchy]:
    async with contextlib.AsyncExitStack() as stack:
        root = await stack.enter_async_context(
            round_services(mqtt, tier="root", tick_s=0.05, **root_settings)
        )
        services = {"aggregator": root.aggregator, "registry": root.registry}
        flat_tls = service_tls("coordinator")
        flat_addr = await stack.enter_async_context(
            serve_app(
                CoordinatorApp(
                    CoordinatorConfig(
                        addr=LOCAL,
                        aggregator_addr=root.aggregator,
                        registry_addr=root.registry,
                        # Its own MQTT identity: the broker takes the user name as the client
                        # id, so a second "coordinator" session would push the root's off.
                        mqtt=mqtt.as_identity(service_tls("flat-reference")),
                        tls=flat_tls,
                        num_samples_cap="none",
                        tick_s=0.05,
                    )
                ),
                tls=flat_tls,
            )
        )
        sites = {}
        for site_id in SITES:
            addr = await stack.enter_async_context(
                site_coordinator(mqtt, site_id, root.coordinator, services)
            )
            sites[site_id] = await stack.enter_async_context(
                clients({"coordinator": addr, "registry": root.registry})
            )
        yield Hierarchy(
            root=await stack.enter_async_context(clients(root)),
            sites=sites,
            flat=await stack.enter_async_context(
                clients({"coordinator": flat_addr, "registry": root.registry})
            ),
            root_addr=root.coordinator,
            services=services,
            endpoints=root,
            mqtt=mqtt,
        )


@pytest.fixture
async def h(mqtt: MqttConfig) -> AsyncIterator[Hierarchy]:
    async with hierarchy(mqtt) as made:
        yield made


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value


def assert_same_to_float64_rounding(actual: Tensors, expected: Tensors) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype == np.float64
        # A few ulps: the two levels sum the same products in another order.
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-13, atol=1e-15)


async def completed(c: Clients, round_id: str) -> coordinator_pb2.RoundStatus:
    st = await c.wait_state(round_id)
    assert st.state == S.ROUND_STATE_COMPLETED, st.failure_reason
    return st


async def run_flat(h: Hierarchy, proplets: Sequence[str], **fields: Any) -> Tensors:
    """The same updates through the flat coordinator: its new model."""
    await h.flat.configure("flat", participants=list(proplets), **fields)
    for p in proplets:
        await h.flat.submit("flat", UPDATES[p])
    st = await completed(h.flat, "flat")
    return await h.flat.model(st.new_model_version)


# ---- the two levels equal the flat round ------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [
        {},
        {"strategy_name": "fedprox", "strategy_params_json": '{"mu": 0.01}'},
        {"strategy_name": "fedadam"},
    ],
    ids=["fedavg", "fedprox", "fedadam"],
)
async def test_two_levels_equal_the_flat_round(
    h: Hierarchy, cli: Cli, strategy: dict[str, str]
) -> None:
    await h.root.configure("r1", participants=list(SITES), experiment_id="hier", **strategy)
    for site_id, proplets in SITES.items():
        st = await h.sites[site_id].configure(
            "r1", participants=list(proplets), timeout_s=SITE_TIMEOUT_S, **strategy
        )
        assert st.state == S.ROUND_STATE_OPEN
    for site_id, proplets in SITES.items():
        for p in proplets:
            await h.sites[site_id].submit("r1", UPDATES[p])

    root = await completed(h.root, "r1")
    # The root counts sites as its updates and every proplet's samples behind them.
    assert sorted(root.reported) == sorted(SITES)
    assert root.num_updates == 2 and root.closed_by == "k_of_n"
    assert root.num_samples == sum(u.num_samples for u in UPDATES.values()) == 130
    everyone = list(UPDATES.values())
    expected_loss = sum(u.metrics["loss"] * u.num_samples for u in everyone) / 130
    assert root.metrics["loss"] == pytest.approx(expected_loss, rel=1e-12)
    for site_id, proplets in SITES.items():
        st = await completed(h.sites[site_id], "r1")
        # A site round makes no model of its own: the root's round does.
        assert (st.num_updates, st.num_samples) == (
            len(proplets),
            sum(UPDATES[p].num_samples for p in proplets),
        )
        assert (st.new_model_version, st.new_model_uri) == (0, "")
    assert await h.root.versions() == [0, root.new_model_version]

    mean_at_root = strategy.get("strategy_name", "fedavg") in ("fedavg", "fedprox")
    if mean_at_root:
        # Its lineage holds the sites' partials as each site signed them: `models verify`
        # checks the signatures against the sites' certificates and recomputes the FedAvg
        # (the one rule it recomputes, flat or not).
        verified = await cli(
            "models", "verify", str(root.new_model_version), "--json", *flags(h.endpoints)
        )
        assert verified.ok().json()["ok"] is True

    two_level = await h.root.model(root.new_model_version)
    flat = await run_flat(h, list(UPDATES), experiment_id="flat", **strategy)
    assert_same_to_float64_rounding(two_level, flat)
    if mean_at_root:
        assert_same_to_float64_rounding(two_level, fedavg(everyone))


# ---- k-of-n at each level ---------------------------------------------------------------


async def test_k_of_n_closes_each_level(h: Hierarchy) -> None:
    # Three sites, two close the root; east closes at 2 of its 3 proplets (c never reports).
    await h.root.configure("r1", participants=["east", "west", "north"], k_of_n=2)
    await h.sites["east"].configure(
        "r1", participants=["a", "b", "c"], k_of_n=2, timeout_s=SITE_TIMEOUT_S
    )
    await h.sites["west"].configure("r1", participants=["d", "e"], timeout_s=SITE_TIMEOUT_S)
    await h.sites["east"].submit("r1", UPDATES["a"])
    await h.sites["east"].submit("r1", UPDATES["b"])
    east = await completed(h.sites["east"], "r1")
    assert (east.closed_by, list(east.reported)) == ("k_of_n", ["a", "b"])
    mid = await h.root.status("r1")
    assert (mid.state, list(mid.reported), mid.num_samples) == (S.ROUND_STATE_OPEN, ["east"], 40)

    await h.sites["west"].submit("r1", UPDATES["d"])
    await h.sites["west"].submit("r1", UPDATES["e"])
    root = await completed(h.root, "r1")
    assert (root.closed_by, root.num_updates, root.num_samples) == ("k_of_n", 2, 70)
    assert sorted(root.reported) == ["east", "west"]
    contributed = [UPDATES[p] for p in ("a", "b", "d", "e")]
    assert_same_to_float64_rounding(await h.root.model(root.new_model_version), fedavg(contributed))
    # The proplet that missed its site's close is late there, as in a flat round.
    err = await rpc_error(h.sites["east"].submit("r1", UPDATES["c"]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_failed_site_lets_the_root_close_at_its_floor(h: Hierarchy) -> None:
    # East's round fails at its deadline with no update; it tells the root, which closes on
    # west's partial at min_k_of_n instead of waiting for its own 60 s deadline.
    await h.root.configure("r1", participants=["east", "west"], k_of_n=2, min_k_of_n=1)
    await h.sites["east"].configure("r1", participants=["a"], timeout_s=0.5)
    await h.sites["west"].configure("r1", participants=["d", "e"], timeout_s=SITE_TIMEOUT_S)
    await h.sites["west"].submit("r1", UPDATES["d"])
    await h.sites["west"].submit("r1", UPDATES["e"])
    east = await h.sites["east"].wait_state("r1")
    assert east.state == S.ROUND_STATE_FAILED
    root = await completed(h.root, "r1")
    assert (root.closed_by, list(root.reported), root.num_samples) == ("min_k_of_n", ["west"], 30)
    assert [f.proplet_id for f in root.failed] == ["east"]
    assert "site round failed: deadline passed with 0 of 1 updates" in root.failed[0].reason
    assert root.completed_at < root.deadline
    assert_same_to_float64_rounding(
        await h.root.model(root.new_model_version), fedavg([UPDATES["d"], UPDATES["e"]])
    )


# ---- what the root refuses ----------------------------------------------------------------


def partial(site_id: str, num_samples: int, contributors: Sequence[str]) -> Update:
    return replace(
        make_update(site_id, [1.0, 1.0, 1.0], 1.0, num_samples),
        contributors=tuple(contributors),
    )


@contextlib.asynccontextmanager
async def as_site(h: Hierarchy, site_id: str) -> AsyncIterator[GrpcUpstream]:
    """The product's own upstream client, calling the root with site `site_id`'s bundle."""
    tls = service_tls(f"site-{site_id}")
    async with channel(h.root_addr, tls) as ch:
        yield GrpcUpstream(ch, load_private_key(tls.key), timeout_s=10.0)


async def test_a_partial_above_its_contributors_caps_is_refused(mqtt: MqttConfig) -> None:
    async with hierarchy(mqtt, num_samples_cap="100") as h:
        await h.root.configure("r1", participants=list(SITES))
        base_sha = (await h.root.status("r1")).base_model_sha256
        async with as_site(h, "east") as east:
            too_many = replace(partial("east", 201, ["a", "b"]), base_model_sha256=base_sha)
            with pytest.raises(InvalidArgument, match=r"num_samples: 201 exceeds the 200 samples"):
                await east.submit("r1", too_many)
            assert (await h.root.status("r1")).num_updates == 0
            await east.submit("r1", replace(too_many, num_samples=200))
            # Sent again (a site that restarted while forwarding): counted once.
            await east.submit("r1", replace(too_many, num_samples=200))
        st = await h.root.status("r1")
        assert (list(st.reported), st.num_samples) == (["east"], 200)


async def test_a_site_whose_proplets_outweigh_the_root_cap_fails_its_round(
    mqtt: MqttConfig,
) -> None:
    # The site takes its proplets' updates (no cap of its own); the root caps each proplet at
    # 15 samples, so the partial of 10 + 30 samples from two proplets is refused there, and
    # the site round fails saying so.
    async with hierarchy(mqtt, num_samples_cap="15") as h:
        await h.root.configure("r1", participants=list(SITES))
        await h.sites["east"].configure("r1", participants=["a", "b"], timeout_s=SITE_TIMEOUT_S)
        await h.sites["east"].submit("r1", UPDATES["a"])
        await h.sites["east"].submit("r1", UPDATES["b"])
        st = await h.sites["east"].wait_state("r1")
        assert st.state == S.ROUND_STATE_FAILED
        assert "num_samples: 40 exceeds the 30 samples of site 'east'" in st.failure_reason
        assert (await h.root.status("r1")).num_updates == 0


async def test_only_sites_submit_to_a_root_each_as_itself(h: Hierarchy) -> None:
    await h.root.configure("r1", participants=list(SITES))
    await h.flat.configure("r1", participants=["a", "east"])
    # A proplet, even one named like a site, goes to its site's coordinator.
    for update in (UPDATES["a"], replace(UPDATES["a"], proplet_id="east")):
        err = await rpc_error(h.root.submit("r1", update))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "submits to its site's coordinator" in (err.details() or "")
    async with as_site(h, "east") as east:
        with pytest.raises(PermissionDenied, match="may only submit as site 'east', not as 'west'"):
            await east.submit("r1", partial("west", 10, ["d"]))
        with pytest.raises(PermissionDenied, match="may only speak for site 'east', not 'west'"):
            await east.report_failure("r1", "west", "not east's to say")
    async with as_site(h, "north") as north:
        with pytest.raises(PermissionDenied, match=r"site 'north' .* is not a participant"):
            await north.submit("r1", partial("north", 10, ["x"]))
    # A site's partial goes only to a root; a flat coordinator takes proplets' updates.
    async with channel(h.flat.coordinator_addr, service_tls("site-east")) as ch:
        upstream = GrpcUpstream(ch, load_private_key(service_tls("site-east").key), timeout_s=10)
        with pytest.raises(PermissionDenied, match="only a root coordinator"):
            await upstream.submit("r1", partial("east", 10, ["a"]))
    root = await h.root.status("r1")
    assert (root.num_updates, list(root.failed)) == (0, [])
    assert (await h.flat.status("r1")).num_updates == 0


async def test_a_proplet_cannot_name_contributors_to_raise_its_cap(h: Hierarchy) -> None:
    await h.flat.configure("r1", participants=["a"])
    err = await rpc_error(h.flat.submit("r1", replace(UPDATES["a"], contributors=("b", "c"))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update.header.contributors" in (err.details() or "")


# ---- what a hierarchical round may be -----------------------------------------------------


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
async def test_order_statistics_are_refused_at_both_levels(h: Hierarchy, strategy: str) -> None:
    for c in (h.root, h.sites["east"]):
        # Five participants: enough for every rule, so only the tier refuses it.
        request = c.configure("r1", participants=list(UPDATES), strategy_name=strategy)
        err = await rpc_error(request)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"strategy_name: {strategy} is an order statistic" in (err.details() or "")
    # ...while a flat coordinator takes them.
    st = await h.flat.configure("r1", participants=list(UPDATES), strategy_name=strategy)
    assert st.strategy_name == strategy


async def test_a_wasm_strategy_is_refused_at_both_levels(h: Hierarchy) -> None:
    params = '{"module": "127.0.0.1:5000/strategies/avg@sha256:' + "a" * 64 + '"}'
    for c in (h.root, h.sites["east"]):
        request = c.configure(
            "r1", participants=list(UPDATES), strategy_name="wasm", strategy_params_json=params
        )
        err = await rpc_error(request)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "strategy_name: wasm runs its module on every update" in (err.details() or "")
    st = await h.flat.configure(
        "r1", participants=list(UPDATES), strategy_name="wasm", strategy_params_json=params
    )
    assert st.strategy_name == "wasm"


async def test_a_site_round_must_be_part_of_the_roots(h: Hierarchy) -> None:
    east = h.sites["east"]
    err = await rpc_error(east.configure("r1", participants=["a"]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the root coordinator has no round 'r1'" in (err.details() or "")

    await h.root.configure("r1", participants=["west"], timeout_s=30)
    err = await rpc_error(east.configure("r1", participants=["a"], timeout_s=20))
    assert "does not list site 'east'" in (err.details() or "")

    await h.root.configure("r2", participants=["east"], timeout_s=30)
    err = await rpc_error(east.configure("r2", participants=["a"], timeout_s=30))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not before the root's deadline" in (err.details() or "")
    st = await east.configure("r2", participants=["a"], timeout_s=20)
    assert st.state == S.ROUND_STATE_OPEN
