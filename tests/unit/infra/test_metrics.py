"""The metrics families (``infra/metrics.py``): lag per partition is the readiness rule's own
measurement split by partition, so it always adds up to the lag ``/readyz`` shows."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from infra.metrics import ReaderCollector, ReaderSample, scrape
from infra.mirror import Freshness, ReaderStatus

KEYS = [("t.facts", p) for p in range(6)]


@settings(max_examples=200, deadline=None)
@given(
    highs=st.lists(st.integers(0, 10_000), min_size=6, max_size=6),
    lows=st.lists(st.integers(0, 10_000), min_size=6, max_size=6),
    positions=st.dictionaries(st.sampled_from(KEYS), st.integers(0, 12_000)),
)
def test_lag_per_partition_adds_up_to_the_readiness_lag(
    highs: list[int], lows: list[int], positions: dict[tuple[str, int], int]
) -> None:
    freshness = Freshness(stale_after=5, max_staleness=5)
    freshness.contact(0.0)
    low = {k: min(lo, hi) for k, lo, hi in zip(KEYS, lows, highs, strict=True)}
    freshness.measured(0.0, dict(zip(KEYS, highs, strict=True)), low)
    verdict = freshness.verdict(1.0, positions)
    assert verdict.lag == sum(verdict.lags.values())
    for key, high in zip(KEYS, highs, strict=True):
        assert verdict.lags[key] == max(0, high - max(positions.get(key, 0), low[key]))


def test_never_measured_has_no_partition_lag() -> None:
    verdict = Freshness(stale_after=5, max_staleness=5).verdict(1.0, {KEYS[0]: 3})
    assert verdict.lag is None and verdict.lags == {}


def status(lags: dict[str, dict[int, int]], ready: bool) -> ReaderStatus:
    return ReaderStatus(
        name="facts-feed",
        ready=ready,
        connected=True,
        caught_up=ready,
        lag=sum(n for parts in lags.values() for n in parts.values()),
        staleness_seconds=0.25,
        positions={},
        waiting_for=None,
        error=None,
        lags=lags,
    )


def test_the_reader_collector_shows_each_partition() -> None:
    registry = CollectorRegistry()
    samples = [ReaderSample("facts", status({"t.facts": {0: 4, 1: 0}}, False), {"t.facts": 9})]
    registry.register(ReaderCollector("api", lambda: samples))
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scrape(registry).decode())
        for s in family.samples
    }
    base = (("reader", "facts"), ("service", "api"))
    assert (
        found[
            ("concierge_consumer_lag_messages", (("partition", "0"), *base, ("topic", "t.facts")))
        ]
        == 4
    )
    assert (
        found[
            ("concierge_consumer_lag_messages", (("partition", "1"), *base, ("topic", "t.facts")))
        ]
        == 0
    )
    assert found[("concierge_reader_ready", base)] == 0
    assert found[("concierge_reader_staleness_seconds", base)] == 0.25
    assert found[("concierge_messages_consumed_total", (*base, ("topic", "t.facts")))] == 9


def test_a_failing_reader_list_leaves_the_scrape_standing() -> None:
    registry = CollectorRegistry()

    def broken() -> list[ReaderSample]:
        raise RuntimeError("boom")

    registry.register(ReaderCollector("api", broken))
    assert b"concierge_consumer_lag_messages" in scrape(registry)  # the family, with no sample
