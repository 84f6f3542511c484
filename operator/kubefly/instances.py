"""Instance rows: what every host agent knows about the machines on its host.

This is the contract between the host agent (which writes rows for its own
host and gossips them), and the readers of its local replica: `kubefly dns`
and `kubefly proxy`. Readers never ask the Kubernetes API.

An instance is one running version of a Machine (Fly's instance_id): the row
key is (org, machine_id); `instance_id` changes when the machine is replaced.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


class InstanceState(str, Enum):
    created = "created"
    starting = "starting"
    started = "started"
    stopping = "stopping"
    stopped = "stopped"
    failed = "failed"
    destroyed = "destroyed"


class CheckStatus(str, Enum):
    passing = "passing"  # also a machine that has no checks
    failing = "failing"
    unknown = "unknown"  # checks defined, none has finished yet


class ConcurrencyType(str, Enum):
    connections = "connections"
    requests = "requests"


class Service(BaseModel):
    """One service of a machine, as the proxy needs it."""

    model_config = ConfigDict(frozen=True)

    internal_port: int = Field(ge=1, le=65535)
    protocol: str = "tcp"
    ports: list[int] = Field(default_factory=list)  # public ports, whatever their handlers
    # The public ports with an `http` handler: only a service with one is served by the
    # HTTP proxy. A service without public ports is private (`.internal` only).
    http_ports: list[int] = Field(default_factory=list)
    concurrency_type: ConcurrencyType = ConcurrencyType.connections
    soft_limit: int = Field(default=20, ge=1)
    hard_limit: int | None = Field(default=None, ge=1)
    autostart: bool = True
    autostop: str = "off"  # off | stop | suspend
    min_machines_running: int = Field(default=0, ge=0)


class Instance(BaseModel):
    """One row of the replicated instance table."""

    model_config = ConfigDict(frozen=True)

    org: str  # Kubernetes namespace
    app: str
    machine_id: str  # Machine name
    instance_id: str
    region: str
    host: str  # node name; the only agent allowed to write this row
    address: str = ""  # pod IP (IPv4 or IPv6); empty until the pod has one
    state: InstanceState
    check_status: CheckStatus = CheckStatus.unknown
    load: int = Field(default=0, ge=0)  # current concurrency, as reported by the host's proxy
    services: list[Service] = Field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return (self.org, self.machine_id)

    @property
    def routable(self) -> bool:
        """Only started instances whose checks pass receive traffic and DNS answers."""
        return (
            self.state is InstanceState.started
            and self.check_status is CheckStatus.passing
            and bool(self.address)
        )
