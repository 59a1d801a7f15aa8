"""A site coordinator with an in-process backend and root (`site.Upstream`) whose answers the
tests script: what it forwards, what it refuses, and the tier settings. The real services,
certificates and a real root are in test_hierarchy.py."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server.coordinator import site as S
from server.coordinator.app import CoordinatorConfig
from server.coordinator.coordinator import Coordinator, RetryPolicy
from server.coordinator.rounds import Round, RoundState, Update
from server.coordinator.store import MemoryRoundStore
from server.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from server.pki import read_identity
from server.round_spec import Hyperparams, RoundSpec
from server.topics import Topics
from tests.coordinator.helpers import Clock, MemoryBackend, fedavg, make_update
from tests.support.environment import config_from_env
from tests.support.security import service_tls

V0 = "fl/models/global_model_v0"
UPDATES = [
    make_update("a", [1.0, 2.0, 3.0], 1.0, 10, loss=0.9),
    make_update("b", [0.0, -1.0, 4.0], -2.0, 30, loss=0.3),
    make_update("c", [5.0, 5.0, 5.0], 0.5, 60, loss=0.1),
]


class Root:
    """A root as a site sees it: one round, the partials it took, the failures it heard;
    `refuse` / `down` make the next submits fail."""

    def __init__(self, rnd: Round) -> None:
        self.rnd = rnd
        self.partials: list[Update] = []
        self.failures: list[tuple[str, str]] = []
        self.refuse: list[Exception] = []
        # Set: submits wait for it (a root that does not answer yet).
        self.gate: asyncio.Event | None = None

    async def round(self, round_id: str) -> Round:
        if round_id != self.rnd.round_id:
            raise NotFound(f"round_id: no round {round_id!r}")
        return self.rnd

    async def submit(self, round_id: str, partial: Update) -> None:
        if self.refuse:
            raise self.refuse.pop(0)
        if self.gate is not None:
            await self.gate.wait()
        self.partials.append(partial)

    async def report_failure(self, round_id: str, site_id: str, reason: str) -> None:
        self.failures.append((site_id, reason))


async def root_round(clock: Clock, **kw: Any) -> Round:
    backend = MemoryBackend()
    base = await backend.resolve("")
    args: dict[str, Any] = {
        "round_id": "r1",
        "experiment_id": "",
        "participants": ("east", "west"),
        "k_of_n": 2,
        "timeout_s": 60.0,
        "model_ref": base.uri,
        "specs": tuple(base.specs),
        "hyperparams": Hyperparams(),
        "task_wasm_image": "",
        "state": RoundState.OPEN,
        "started_at": clock.now,
        "deadline": clock.now + 60.0,
        "base_model_sha256": base.sha256,
    }
    args.update(kw)
    return Round(**args)


async def make_site(
    root: Root | None = None, store: MemoryRoundStore | None = None, **root_kw: Any
) -> tuple[Coordinator, Root, Clock]:
    clock = Clock()
    root = root or Root(await root_round(clock, **root_kw))

    async def publish(topic: str, payload: bytes) -> None:
        raise AssertionError("a site publishes no round notice")

    coord = Coordinator(
        store or MemoryRoundStore(),
        MemoryBackend(),
        publish,
        Topics("unit", "fl"),
        retry=RetryPolicy(attempts=3, initial_backoff_s=0.001),
        clock=clock,
        hierarchy=S.Hierarchy(S.SITE, "east"),
        upstream=root,
    )
    return coord, root, clock


def spec(**kw: Any) -> RoundSpec:
    args: dict[str, Any] = {"round_id": "r1", "participants": ("a", "b", "c"), "timeout_s": 10}
    args.update(kw)
    return RoundSpec(**args)


async def test_the_partial_is_the_weighted_mean_with_the_sample_total() -> None:
    coord, root, _ = await make_site()
    await coord.configure(spec(), start=True)
    for u in UPDATES:
        await coord.submit("r1", u)
    await coord.wait_finishing()
    (partial,) = root.partials
    assert (partial.proplet_id, partial.base_model_uri, partial.num_samples) == ("east", V0, 100)
    assert partial.contributors == ("a", "b", "c")
    assert partial.metrics["loss"] == pytest.approx((0.9 * 10 + 0.3 * 30 + 0.1 * 60) / 100)
    assert partial.base_model_sha256 == root.rnd.base_model_sha256
    for name, expected in fedavg(UPDATES).items():
        np.testing.assert_allclose(partial.tensors[name], expected, rtol=1e-15)
    done = await coord.get("r1")
    assert done.state is RoundState.COMPLETED
    assert (done.new_model_version, done.new_model_uri) == (None, "")
    assert not root.failures


async def test_a_root_that_is_down_is_retried_and_a_refusal_fails_the_site_round() -> None:
    coord, root, _ = await make_site()
    root.refuse = [Unavailable("root coordinator: SubmitUpdate: connection refused")]
    await coord.configure(spec(participants=("a",)), start=True)
    await coord.submit("r1", UPDATES[0])
    await coord.wait_finishing()
    assert len(root.partials) == 1 and (await coord.get("r1")).state is RoundState.COMPLETED

    root.rnd = replace(root.rnd, round_id="r2")
    root.refuse = [InvalidArgument("num_samples: 10 exceeds the 5 samples of site 'east'")]
    await coord.configure(spec(round_id="r2", participants=("a",)), start=True)
    await coord.submit("r2", UPDATES[0])
    await coord.wait_finishing()
    failed = await coord.get("r2")
    assert failed.state is RoundState.FAILED
    assert "forwarding the site's partial failed: num_samples: 10 exceeds" in failed.failure_reason
    # ...and the root hears that this site will not report.
    assert root.failures == [("east", failed.failure_reason)]


async def test_a_site_stopped_while_forwarding_forwards_the_same_partial_after_restart() -> None:
    store = MemoryRoundStore()
    first, root, _ = await make_site(store=store)
    root.gate = asyncio.Event()  # the root does not answer before the site stops
    await first.configure(spec(), start=True)
    for u in UPDATES:
        await first.submit("r1", u)
    await first.aclose()
    assert (await store.get("r1")).state is RoundState.AGGREGATING  # type: ignore[union-attr]
    assert root.partials == []

    root.gate = None
    again, _, _ = await make_site(root=root, store=store)
    await again.resume()
    await again.wait_finishing()
    (partial,) = root.partials
    assert (partial.num_samples, partial.contributors) == (100, ("a", "b", "c"))
    assert (await again.get("r1")).state is RoundState.COMPLETED


async def test_a_site_round_failing_at_its_deadline_tells_the_root() -> None:
    coord, root, clock = await make_site()
    await coord.configure(spec(), start=True)
    clock.now += 11
    await coord.close_due()
    await coord.wait_finishing()
    assert root.failures == [("east", "deadline passed with 0 of 3 updates")]
    assert not root.partials


@pytest.mark.parametrize(
    ("root_kw", "spec_kw", "message"),
    [
        ({"participants": ("west",)}, {}, "does not list site 'east'"),
        ({"state": RoundState.COMPLETED}, {}, "is completed"),
        ({"model_ref": "fl/models/global_model_v7"}, {}, "trains 'fl/models/global_model_v7'"),
        ({"strategy_name": "fedadam"}, {}, "aggregates by 'fedadam'"),
        ({}, {"round_id": "r9"}, "the root coordinator has no round 'r9'"),
        ({}, {"timeout_s": 60}, "not before the root's deadline"),
        ({"state": RoundState.PENDING}, {"timeout_s": 60}, "not shorter than the root round's"),
        ({}, {"strategy_name": "krum"}, "krum is an order statistic"),
    ],
)
async def test_a_site_round_that_is_not_part_of_the_roots_is_refused(
    root_kw: dict[str, Any], spec_kw: dict[str, Any], message: str
) -> None:
    coord, _, _ = await make_site(**root_kw)
    with pytest.raises(FailedPrecondition, match=message):
        await coord.configure(spec(**spec_kw), start=True)
    assert await coord.list() == []


async def test_a_pending_site_round_checks_the_roots_deadline_when_it_starts() -> None:
    coord, _, clock = await make_site()
    await coord.configure(spec(timeout_s=30))
    clock.now += 40  # the root's deadline is 20 s away now
    with pytest.raises(FailedPrecondition, match="not before the root's deadline"):
        await coord.start("r1")
    assert (await coord.get("r1")).state is RoundState.PENDING


def test_tier_settings() -> None:
    c = config_from_env(
        CoordinatorConfig,
        PROPELLER_COORDINATOR_TIER="site",
        PROPELLER_COORDINATOR_UPSTREAM="root:8086",
        PROPELLER_COORDINATOR_SITE_ID="east",
    )
    assert c.hierarchy == S.Hierarchy("site", "east") and c.upstream_addr == "root:8086"
    assert config_from_env(CoordinatorConfig).hierarchy == S.Hierarchy()
    bad: list[tuple[dict[str, Any], str]] = [
        ({"tier": "edge"}, "tier: 'edge' must be one of flat, root, site"),
        ({"tier": "site", "upstream_addr": "root:1"}, "site_id"),
        ({"tier": "site", "site_id": "east"}, "upstream_addr: a site coordinator"),
        ({"tier": "root", "upstream_addr": "root:1"}, "upstream_addr: a site coordinator"),
        ({"tier": "root", "site_id": "east"}, "site_id: 'east' is only for tier 'site'"),
    ]
    for settings, message in bad:
        with pytest.raises(ValueError, match=message):
            CoordinatorConfig(tls=None, **settings)


def test_a_site_signs_its_partials_only_with_its_own_certificate() -> None:
    east = S.Hierarchy(S.SITE, "east")
    assert east.signing_key(None) is None  # plaintext: unsigned partials
    assert isinstance(east.signing_key(service_tls("site-east")), ec.EllipticCurvePrivateKey)
    wrong = service_tls("site-west")
    with pytest.raises(ValueError) as excinfo:
        east.signing_key(wrong)
    message = str(excinfo.value)
    assert message.startswith("site_id: 'east' needs the certificate of "), message
    assert message.endswith(f"but {wrong.cert} is {read_identity(wrong.cert)}'s"), message
