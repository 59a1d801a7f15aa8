"""The `/metrics` endpoint's setting and lifetime (server/metrics.py)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY

from server.metrics import MetricsConfig, serving_metrics, update_rejected
from tests.operations.scrape import scrape_now

pytestmark = pytest.mark.integration


def test_off_unless_set() -> None:
    assert MetricsConfig.from_env({}).addr == ""
    with serving_metrics(MetricsConfig.from_env({})) as endpoint:
        assert endpoint is None


@pytest.mark.parametrize("addr", ["9464", "host:", ":9464", "host:65536", "host:x", "[::1]"])
def test_a_malformed_address_names_the_variable(addr: str) -> None:
    message = f"PROPELLER_METRICS_ADDR: {addr!r} is not host:port (port 0..65535)"
    with pytest.raises(ValueError, match=re.escape(message)):
        MetricsConfig.from_env({"PROPELLER_METRICS_ADDR": addr})


def test_port_0_serves_on_a_free_port_until_the_block_ends() -> None:
    config = MetricsConfig.from_env({"PROPELLER_METRICS_ADDR": "127.0.0.1:0"})
    with serving_metrics(config) as endpoint:
        assert endpoint is not None and endpoint.host == "127.0.0.1" and endpoint.port > 0
        # Every metric is there from the start (a labelled one once it has moved).
        names = {name for name, _ in scrape_now(endpoint.url)}
        assert {
            "propeller_proplets_alive",
            "propeller_wasm_run_seconds_count",
            "propeller_mqtt_reconnects_total",
        } <= names
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(endpoint.url, timeout=5)


@pytest.mark.parametrize(
    ("details", "field"),
    [
        ("update.header.tensors: 400 bytes, but ...", "update.header.tensors"),
        ("update.tensors[w]: shape (4,) != (3,)", "update.tensors[]"),
        ("update.tensors[evil-1]: shape (4,) != (3,)", "update.tensors[]"),
        ("round 'r1' is completed", ""),
        (None, ""),
    ],
)
def test_a_rejection_is_labelled_by_its_field_not_by_request_values(
    details: str | None, field: str
) -> None:
    labels = {"outcome": "rejected", "code": "INVALID_ARGUMENT", "field": field}
    before = REGISTRY.get_sample_value("propeller_updates_total", labels) or 0.0
    update_rejected(grpc.StatusCode.INVALID_ARGUMENT, details)
    assert REGISTRY.get_sample_value("propeller_updates_total", labels) == before + 1


def test_a_taken_port_is_refused_naming_the_variable() -> None:
    with serving_metrics(MetricsConfig("127.0.0.1:0")) as taken:
        assert taken is not None
        config = MetricsConfig(f"127.0.0.1:{taken.port}")
        refused = re.escape(f"PROPELLER_METRICS_ADDR: cannot listen on {config.addr}: ")
        with pytest.raises(ValueError, match=refused), serving_metrics(config):
            pass
