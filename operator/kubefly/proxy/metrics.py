"""The proxy's Prometheus series, labelled per app (org, app).

Requests and their latency are counted on every request, so they are plain
integers in the proxy's own dicts, read by a collector at scrape time:
prometheus_client's labelled children take a lock and walk the buckets on
every observation, which costs more than routing a small request.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

RETRIES = Counter("kubefly_proxy_retries", "Requests reissued to another instance", ["org", "app"])
FULL = Counter("kubefly_proxy_full", "'full' answers: an instance at its hard limit", ["org", "app"])
AUTOSTARTS = Counter("kubefly_proxy_autostarts", "Stopped machines started for a request", ["org", "app"])
AUTOSTOPS = Counter("kubefly_proxy_autostops", "Idle machines stopped", ["org", "app"])
REPLAY_HELD = Gauge("kubefly_proxy_replay_buffered_bytes", "Request bodies held in memory for a retry (replay budget in use)")


class AppStats:
    """One app's answered requests (by status) and their latency histogram."""

    __slots__ = ("codes", "buckets", "total", "count")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def answered(self, status: int) -> None:
        self.codes[status] = self.codes.get(status, 0) + 1

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


class RequestCollector:
    """Exposes every AppStats as kubefly_proxy_requests_total and
    kubefly_proxy_request_duration_seconds."""

    def __init__(self) -> None:
        self.apps: dict[tuple[str, str], AppStats] = {}

    def stats(self, app: tuple[str, str]) -> AppStats:
        stats = self.apps.get(app)
        if stats is None:
            stats = self.apps[app] = AppStats()
        return stats

    def collect(self):
        requests = CounterMetricFamily("kubefly_proxy_requests", "Requests answered at the edge",
                                       labels=["org", "app", "code"])
        latency = HistogramMetricFamily("kubefly_proxy_request_duration_seconds",
                                        "Time from request headers to the end of the response", labels=["org", "app"])
        for (org, app), stats in list(self.apps.items()):
            for code, n in sorted(stats.codes.items()):
                requests.add_metric([org, app, str(code)], n)
            cumulative, running = [], 0
            for bound, n in zip((*BUCKETS, float("inf")), stats.buckets):
                running += n
                cumulative.append((str(float(bound)) if bound != float("inf") else "+Inf", running))
            latency.add_metric([org, app], cumulative, stats.total)
        yield requests
        yield latency


REQUESTS = RequestCollector()
REGISTRY.register(REQUESTS)
