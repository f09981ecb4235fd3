"""Prometheus metrics of the reward service, in a registry of its own (one per app, so tests can build many)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.reward.verify import VerifierPool
from shared.contracts.wire import ScoreResult, ScoreStatus


class _PoolCollector(Collector):
    """Reads the pool's own counters at scrape time (the pool thread owns them)."""

    def __init__(self, get_pool: Callable[[], VerifierPool | None]):
        self._get_pool = get_pool

    def collect(self) -> Iterable[Metric]:
        pool = self._get_pool()
        if pool is None:
            return
        s = pool.stats()
        yield CounterMetricFamily(
            "gtpo_reward_pool_restarts", "Verifier workers started to replace a killed or dead one", s["restarts"]
        )
        yield CounterMetricFamily(
            "gtpo_reward_pool_kills", "Verifier workers killed at the hard time limit", s["kills"]
        )
        yield CounterMetricFamily("gtpo_reward_pool_deaths", "Verifier workers that died on their own", s["deaths"])
        yield GaugeMetricFamily("gtpo_reward_pool_ready_workers", "Warm verifier workers", s["ready_workers"])
        yield GaugeMetricFamily(
            "gtpo_reward_pool_busy_workers", "Verifier workers checking an answer", s["busy_workers"]
        )


class RewardMetrics:
    """Items scored by status, request latency, and the pool's restarts / kills / deaths."""

    def __init__(self, get_pool: Callable[[], VerifierPool | None]):
        self.registry = CollectorRegistry()
        self.items = Counter("gtpo_reward_items", "Items scored, by status", ["status"], registry=self.registry)
        for status in ScoreStatus:
            self.items.labels(status.value)  # export zeros: a rate() of a missing series is no rate at all
        self.latency = Histogram(
            "gtpo_reward_score_seconds",
            "Wall time of one POST /v1/score",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.registry.register(_PoolCollector(get_pool))

    def observe(self, results: Sequence[ScoreResult]) -> None:
        for r in results:
            self.items.labels(ScoreStatus(r.status).value).inc()
