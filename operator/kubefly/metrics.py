"""Prometheus /metrics for kubefly's long-running processes."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest, start_http_server


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on its own thread (for processes without an HTTP server of their own)."""
    start_http_server(port, addr=addr)


def exposition() -> tuple[bytes, str]:
    """Body and content type of /metrics, for processes that already run aiohttp."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
