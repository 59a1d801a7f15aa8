"""Reading a `/metrics` endpoint as Prometheus would: over HTTP, in the text format."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, frozenset[tuple[str, str]]]


class Scrape(dict[Sample, float]):
    """One scrape: (sample name, its labels) -> value."""

    def value(self, name: str, **labels: str) -> float:
        """The sample `name` with exactly `labels` (0 when the scrape has none: a labelled
        counter appears once it first moves)."""
        return self.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of `name` over every sample whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.items() if n == name and wanted <= ls)

    def moved(self, since: Mapping[Sample, float]) -> dict[Sample, float]:
        """What changed from the scrape `since`, by how much."""
        return {k: v - since.get(k, 0.0) for k, v in self.items() if v != since.get(k, 0.0)}


def scrape_now(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    out = Scrape()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def scrape(url: str) -> Scrape:
    return await asyncio.to_thread(scrape_now, url)
