"""Machine: one Fly Machine, which kubefly runs as one pod pinned to a host."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Literal

import re

from pydantic import Field, StringConstraints, field_validator, model_validator

from kubefly.api.common import (
    AGE,
    ApiModel,
    AppName,
    CrdInfo,
    DnsLabel,
    Guest,
    PrinterColumn,
    RegionName,
    Resource,
    StatusModel,
    cel,
    immutable,
    keys_matching,
    validations,
)

TcpPort = Annotated[int, Field(ge=1, le=65535)]

# Input the pod, the kubelet or an HTTP check would read differently from what the user
# meant is refused at the API server (schema pattern or CEL), and by the model the same way.
# An image reference: printable ASCII, no whitespace.
IMAGE_PATTERN = r"^[!-~]+$"
# An environment variable name: printable ASCII except "=" and space (what Kubernetes'
# relaxed env validation accepts), so no empty name, no "=", no newline.
ENV_NAME_PATTERN = r"^[!-<>-~]+$"
ENV_NAMES_RULE = cel(
    f"self.all(k, size(k) <= 255 && k.matches('{ENV_NAME_PATTERN}'))",
    "spec.env names must be 1 to 255 printable ASCII characters without '=' or whitespace: rename the variable",
)
# An HTTP check's request target and header lines: no CR, LF or other control characters.
CHECK_PATH_PATTERN = r"^/[!-~]*$"
HEADER_NAME_PATTERN = r"^[!#-'*+.0-9A-Z^-z|~-]+$"  # an RFC 9110 token
HEADER_VALUE_PATTERN = r"^[ -~]*$"
HEADER_NAMES_RULE = cel(
    f'self.all(k, size(k) <= 255 && k.matches("{HEADER_NAME_PATTERN}"))',
    "spec.checks[].headers names must be HTTP tokens (letters, digits, !#$%&'*+-.^_`|~; at most 255): rename the header",
)
HeaderValue = Annotated[str, StringConstraints(max_length=4096, pattern=HEADER_VALUE_PATTERN)]
# A mount path is clean (no empty, "." or ".." segment, no trailing "/") and does not cover
# what the runtime or Kubernetes put in the container.
MOUNT_PATH_PATTERN = r"^(/[^/\x00-\x1f\x7f]+)+$"
MOUNT_DOTS = r"(^|/)[.][.]?(/|$)"
MOUNT_RESERVED = r"^/(proc|sys|dev|run/secrets|var/run/secrets)(/|$)"
MOUNT_PATH_RULE = cel(
    f"!self.matches('{MOUNT_DOTS}') && !self.matches('{MOUNT_RESERVED}')",
    "spec.mounts[].path must not contain '.' or '..' segments nor be or be under /proc, /sys, /dev,"
    " /run/secrets or /var/run/secrets: mount the volume elsewhere, e.g. /data",
)
# Sent by a preStop hook (machines/pod.py). Not SIGKILL: PID 1 cannot be killed from inside
# its own PID namespace, and the kubelet always sends SIGTERM before its SIGKILL.
Signal = Literal["SIGINT", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2"]


class Port(ApiModel):
    """A public port of a service, served by the proxy."""

    port: TcpPort
    handlers: list[Literal["http", "tls"]] = Field(default_factory=list, max_length=2)
    force_https: bool = False


SOFT_LIMIT_RULE = cel(
    "!has(self.hardLimit) || self.softLimit <= self.hardLimit",
    "concurrency.softLimit must be <= concurrency.hardLimit: lower softLimit or raise hardLimit",
    ".softLimit",
)


class Concurrency(ApiModel):
    """Load at which the proxy prefers other instances (soft) and stops sending more (hard)."""

    model_config = {"json_schema_extra": validations(SOFT_LIMIT_RULE)}

    type: Literal["connections", "requests"] = "connections"
    soft_limit: int = Field(default=20, ge=1, le=100000)
    hard_limit: int | None = Field(default=None, ge=1, le=100000)

    @model_validator(mode="after")
    def _soft_below_hard(self):
        if self.hard_limit is not None and self.soft_limit > self.hard_limit:
            raise ValueError(SOFT_LIMIT_RULE["message"])
        return self


# Fly's "suspend" (processes frozen, memory kept) is not built: refused rather than run as "stop".
SUSPEND_RULE = cel(
    "self != 'suspend'",
    "spec.services[].autostop: suspend is not supported (kubefly cannot keep a machine's memory yet): use stop",
)


class Service(ApiModel):
    internal_port: TcpPort
    protocol: Literal["tcp", "udp"] = "tcp"
    ports: list[Port] = Field(default_factory=list, max_length=16)
    concurrency: Concurrency = Field(default_factory=Concurrency)
    autostart: bool = Field(default=True, description="Start a stopped machine when a request arrives.")
    autostop: Literal["off", "stop", "suspend"] = Field(
        default="off", description="Stop an idle machine (suspend is refused). Quote \"off\" in YAML.",
        json_schema_extra=validations(SUSPEND_RULE),
    )
    min_machines_running: int = Field(default=0, ge=0, le=1000)

    @field_validator("autostop")
    @classmethod
    def _no_suspend(cls, value: str) -> str:
        if value == "suspend":
            raise ValueError(SUSPEND_RULE["message"])
        return value


class Check(ApiModel):
    """A health check; a failing check takes the instance out of routing, never restarts it."""

    name: DnsLabel
    type: Literal["tcp", "http"]
    port: TcpPort
    path: str | None = Field(
        default=None, max_length=1024, pattern=CHECK_PATH_PATTERN,
        description="HTTP checks: the request path (printable ASCII, no spaces).",
    )
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] | None = Field(
        default=None, description="HTTP checks: the request method (GET when unset)."
    )
    interval_seconds: int = Field(default=15, ge=1, le=3600)
    timeout_seconds: int = Field(default=2, ge=1, le=600)
    grace_period_seconds: int = Field(default=0, ge=0, le=3600)
    headers: dict[str, HeaderValue] = Field(
        default_factory=dict, max_length=16, json_schema_extra=validations(HEADER_NAMES_RULE)
    )

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        return keys_matching(headers, HEADER_NAME_PATTERN, HEADER_NAMES_RULE)


class Mount(ApiModel):
    volume: DnsLabel = Field(description="Name of a Volume of the same app, on the machine's host.")
    path: str = Field(
        min_length=2, max_length=255, pattern=MOUNT_PATH_PATTERN, json_schema_extra=validations(MOUNT_PATH_RULE)
    )

    @field_validator("path")
    @classmethod
    def _safe_path(cls, path: str) -> str:
        if re.search(MOUNT_DOTS, path) or re.search(MOUNT_RESERVED, path):
            raise ValueError(MOUNT_PATH_RULE["message"])
        return path


class Restart(ApiModel):
    policy: Literal["no", "always", "on-failure"] = Field(default="on-failure", description='Quote "no" in YAML.')
    max_retries: int = Field(default=10, ge=0, le=1000, description="on-failure: restarts within 5 minutes before giving up.")


class Stop(ApiModel):
    signal: Signal = Field(
        default="SIGINT",
        description="Sent to the machine's main process (PID 1) at stop; any but SIGTERM needs /bin/sh in the "
        "image (a preStop hook sends it). SIGKILL is refused: timeoutSeconds bounds the stop.",
    )
    timeout_seconds: int = Field(
        default=5, ge=1, le=300,
        description="Wait after the signal before the machine is killed: the pod's terminationGracePeriodSeconds "
        "(with a signal other than SIGTERM, the kubelet then sends SIGTERM, and SIGKILL 2 s later).",
    )


CHECK_NAMES_RULE = cel(
    "self.all(c, self.exists_one(d, d.name == c.name))",
    "spec.checks names must be unique: rename the duplicate check",
)
# Transition rule on the whole spec: mounts may be neither added, removed nor changed.
MOUNTS_RULE = cel(
    "(has(self.mounts) ? size(self.mounts) : 0) == (has(oldSelf.mounts) ? size(oldSelf.mounts) : 0)"
    " && (!has(self.mounts) || size(self.mounts) == 0 || self.mounts == oldSelf.mounts)",
    "spec.mounts is immutable: a machine keeps its volume; create a new Machine to mount another",
    ".mounts",
)


class MachineSpec(ApiModel):
    model_config = {"json_schema_extra": validations(MOUNTS_RULE)}

    app: AppName = Field(json_schema_extra=immutable("spec.app", "create a new Machine in the other app"))
    region: RegionName = Field(
        json_schema_extra=immutable("spec.region", "create a new Machine in the other region")
    )
    image: str = Field(min_length=1, max_length=1024, pattern=IMAGE_PATTERN, description="An image reference (no whitespace).")
    guest: Guest = Field(default_factory=Guest)
    env: dict[str, str] = Field(default_factory=dict, max_length=256, json_schema_extra=validations(ENV_NAMES_RULE))
    secrets: list[DnsLabel] | None = Field(
        default=None, max_length=32, description="AppSecret names to inject; unset: every AppSecret of the app."
    )
    services: list[Service] = Field(default_factory=list, max_length=16)
    checks: list[Check] = Field(default_factory=list, max_length=16, json_schema_extra=validations(CHECK_NAMES_RULE))
    mounts: list[Mount] = Field(default_factory=list, max_length=1, description="At most one volume per machine.")
    restart: Restart = Field(default_factory=Restart)
    stop: Stop = Field(default_factory=Stop)
    state: Literal["started", "stopped"] = Field(default="started", description="Desired state.")
    metadata: dict[str, str] = Field(default_factory=dict, max_length=64)

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        return keys_matching(env, ENV_NAME_PATTERN, ENV_NAMES_RULE)

    @field_validator("checks")
    @classmethod
    def _unique_check_names(cls, checks: list[Check]) -> list[Check]:
        names = [c.name for c in checks]
        if len(names) != len(set(names)):
            raise ValueError(CHECK_NAMES_RULE["message"])
        return checks


class MachineState(str, Enum):
    created = "created"
    starting = "starting"
    started = "started"
    stopping = "stopping"
    stopped = "stopped"
    replacing = "replacing"
    destroying = "destroying"
    destroyed = "destroyed"
    failed = "failed"


class MachineEvent(ApiModel):
    """One entry of the machine's event log (Fly's machine events)."""

    type: str = Field(max_length=63, description="launch, start, stop, exit, restart, update, ...")
    status: str = Field(max_length=63)
    source: Literal["user", "kubefly"]
    timestamp: datetime
    message: str | None = Field(default=None, max_length=1024)
    exit_code: int | None = None
    oom_killed: bool | None = None
    requested_by: str | None = Field(default=None, max_length=253)


class MachineStatus(StatusModel):
    state: MachineState | None = None
    host: str | None = None
    region: str | None = None
    instance_id: str | None = Field(default=None, description="Changes every time the machine is replaced.")
    version: int | None = Field(default=None, ge=0)
    address: str | None = None
    restart_count: int | None = Field(default=None, ge=0)
    spec_digest: str | None = Field(default=None, description="Digest of the spec the current version was built from.")
    rolled_secrets_digest: str | None = Field(
        default=None, description="The secrets-digest annotation the last replace acted on."
    )
    retry_window_start: datetime | None = Field(default=None, description="Start of the current 5-minute restart window.")
    retry_window_base: int | None = Field(default=None, ge=0, description="restartCount when the window started.")
    events: list[MachineEvent] = Field(default_factory=list, max_length=20, description="The latest events, newest last.")


class Machine(Resource):
    crd = CrdInfo(
        plural="machines",
        short_names=("mach",),
        columns=(
            PrinterColumn("App", ".spec.app"),
            PrinterColumn("Region", ".spec.region"),
            PrinterColumn("State", ".status.state"),
            PrinterColumn("Host", ".status.host"),
            PrinterColumn("Image", ".spec.image"),
            AGE,
        ),
        label_safe_name=True,
    )

    kind: Literal["Machine"] = "Machine"
    spec: MachineSpec
    status: MachineStatus | None = None
