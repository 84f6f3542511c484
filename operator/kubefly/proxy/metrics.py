"""The proxy's Prometheus series, labelled per app (org, app)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("kubefly_proxy_requests", "Requests answered at the edge", ["org", "app", "code"])
LATENCY = Histogram(
    "kubefly_proxy_request_duration_seconds",
    "Time from request headers to the end of the response",
    ["org", "app"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRIES = Counter("kubefly_proxy_retries", "Requests reissued to another instance", ["org", "app"])
FULL = Counter("kubefly_proxy_full", "'full' answers: an instance at its hard limit", ["org", "app"])
AUTOSTARTS = Counter("kubefly_proxy_autostarts", "Stopped machines started for a request", ["org", "app"])
AUTOSTOPS = Counter("kubefly_proxy_autostops", "Idle machines stopped", ["org", "app"])
