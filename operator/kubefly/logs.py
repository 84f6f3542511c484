"""structlog JSON logging for every kubefly process.

The standard library's loggers (Kopf, aiohttp, kubernetes) are routed through
the same JSON renderer so one process writes one log format.
"""

from __future__ import annotations

import logging
import sys

import structlog

def _kopf_object(_, __, event: dict) -> dict:
    """Kopf passes the object as `k8s_ref` (plus its settings): keep kind/namespace/name only."""
    ref = event.pop("k8s_ref", None)
    for noise in ("settings", "k8s_skip"):
        event.pop(noise, None)
    if isinstance(ref, dict):
        event.setdefault("kind", ref.get("kind"))
        event.setdefault("namespace", ref.get("namespace"))
        event.setdefault("name", ref.get("name"))
    return event


_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.ExtraAdder(),
    _kopf_object,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
    structlog.processors.format_exc_info,
]


def configure(level: str = "INFO", component: str | None = None) -> None:
    """Send every log record to stderr as one JSON object per line."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if component:
        structlog.contextvars.bind_contextvars(component=component)


def get(logger_name: str, /, **bound) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(logger_name).bind(**bound)
