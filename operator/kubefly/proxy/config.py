"""The proxy's settings: flags give the defaults, an optional YAML file overrides them and
is re-read on SIGHUP without dropping a connection."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from kubefly.proxy.routing import STRATEGIES


class Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str = "kubefly.localhost"
    # Retries after "full" answers or refused connections, and the time a
    # request may spend waiting for a slot when every instance is full.
    max_attempts: int = Field(default=20, ge=1)
    retry_budget_s: float = Field(default=1.0, gt=0)
    # Bodies up to this size are buffered so the request can be retried or replayed.
    replay_body_limit: int = Field(default=1024 * 1024, ge=0)
    # All bodies held at once for a retry, across every request of this proxy: past it a body
    # streams (no retry on another instance) instead of growing memory with the clients.
    replay_budget_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    max_replays: int = Field(default=10, ge=0)
    connect_timeout_s: float = Field(default=3.0, gt=0)
    header_timeout_s: float = Field(default=10.0, gt=0)  # client must send headers within
    response_timeout_s: float = Field(default=60.0, gt=0)  # instance must answer headers within
    idle_timeout_s: float = Field(default=60.0, gt=0)  # keep-alive and mid-stream silence
    total_timeout_s: float = Field(default=300.0, gt=0)
    pool_idle_s: float = Field(default=4.0, gt=0)
    # Per-app budget: requests of one app in flight at this proxy; beyond it, 503
    # at once, so one app's flood cannot starve the others.
    app_max_inflight: int = Field(default=1000, ge=1)
    autostart_timeout_s: float = Field(default=30.0, gt=0)
    autostop_interval_s: float = Field(default=60.0, gt=0)
    # leastload for apps with more instances than this, or named here.
    leastload_threshold: int = Field(default=64, ge=1)
    strategies: dict[str, str] = Field(default_factory=dict)  # "org/app" -> strategy
    sample: int = Field(default=8, ge=1)
    # The port every host's proxy takes edge -> host hops on (a DaemonSet's host port);
    # the address is the host's own, as its agent advertises it. Default: this
    # proxy's own --hop-listen port.
    hop_port: int | None = Field(default=None, ge=1, le=65535)
    # Shared by the platform's proxies (--hop-token-file): edges send it on every hop; a host
    # refuses hops without it. Empty (standalone): hops are taken, their forwarding headers dropped.
    hop_token: str = ""

    def strategy_for(self, org: str, app: str, n_instances: int) -> str:
        if self.strategies:  # most configs name none: skip building the key per request
            named = self.strategies.get(f"{org}/{app}")
            if named:
                return named
        return "leastload" if n_instances > self.leastload_threshold else "closest"


def load(path: Path | None, overrides: dict) -> Config:
    data = dict(overrides)
    if path is not None:
        data.update(yaml.safe_load(path.read_text()) or {})
    cfg = Config(**data)
    for name in cfg.strategies.values():
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
    return cfg
