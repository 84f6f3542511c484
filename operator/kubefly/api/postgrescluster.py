"""PostgresCluster: Volumes + Machines running postgres and repmgr, with Services and credentials.

repmgr elects the primary inside the cluster; the operator observes and
reports (status.primary, members, lastFailover) and is not in the failover path.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, model_validator

from kubefly.api.common import (
    AGE,
    AppName,
    ApiModel,
    CrdInfo,
    DnsLabel,
    Guest,
    PrinterColumn,
    RegionName,
    Resource,
    StatusModel,
    cel,
    immutable,
    validations,
)

SYNCHRONOUS_RULE = cel(
    "!self.synchronous || self.members >= 2",
    "spec.synchronous needs a standby to confirm commits: set spec.members to 2 or more, or synchronous to false",
    ".synchronous",
)
VOLUME_GROWS_RULE = cel(
    "self >= oldSelf", "spec.volumeSizeGb may only grow (volumes cannot shrink): set it to at least its current value"
)


class PostgresBackups(ApiModel):
    """WAL archiving and base backups to the platform's object store (docs/postgres.md)."""

    scheduled: bool = Field(default=True, description="Take a full base backup every intervalHours (a PostgresBackup each).")
    interval_hours: int = Field(default=24, ge=1, le=168, description="Hours between scheduled base backups.")
    recovery_window_days: int = Field(
        default=7, ge=1, le=365,
        description="Days back a point-in-time restore can reach: backups and WAL are kept at least this long.",
    )


ONE_TARGET_RULE = cel(
    "[has(self.targetTime), has(self.targetLSN), has(self.targetName), has(self.latest) && self.latest]"
    ".filter(x, x).size() == 1",
    "spec.restore needs exactly one target: targetTime, targetLSN, targetName or latest: true",
)
RESTORE_AT_CREATION_RULE = cel(
    "has(self.restore) == has(oldSelf.restore)",
    "spec.restore is set only when a cluster is created (it is its first data): create a new PostgresCluster to restore into",
)


class PostgresRestore(ApiModel):
    """Start the cluster from another cluster's backup and WAL (point-in-time recovery)."""

    from_: DnsLabel = Field(
        alias="from",
        description="The PostgresCluster in this namespace whose archive to restore; it may be deleted, and its "
                    "completed PostgresBackups say where its archive is. Never this cluster: it archives apart.",
    )
    target_time: datetime | None = Field(default=None, description="Replay up to this instant (RFC 3339).")
    target_lsn: str | None = Field(default=None, alias="targetLSN", pattern=r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$",
                                   description="Replay up to this WAL position.")
    target_name: str | None = Field(default=None, min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.-]+$",
                                    description="Replay up to this restore point (pg_create_restore_point).")
    latest: bool | None = Field(default=None, description="true: replay everything in the archive.")
    backup: str | None = Field(
        default=None, max_length=64, pattern=r"^[0-9]{8}-[0-9]{6}F(_[0-9]{8}-[0-9]{6}[DI])?$",
        description="The backup label to start from (a PostgresBackup's status.label); default: the newest one "
                    "that ends before the target.",
    )

    @model_validator(mode="after")
    def _one_target(self):
        if sum([self.target_time is not None, self.target_lsn is not None, self.target_name is not None,
                bool(self.latest)]) != 1:
            raise ValueError(ONE_TARGET_RULE["message"])
        return self


class PostgresClusterSpec(ApiModel):
    model_config = {"json_schema_extra": validations(SYNCHRONOUS_RULE, RESTORE_AT_CREATION_RULE)}

    app: AppName = Field(json_schema_extra=immutable("spec.app", "create a new PostgresCluster in the other app"))
    members: int = Field(default=3, ge=1, le=7, description="Postgres members; 3 or more for automatic failover.")
    region: RegionName = Field(
        json_schema_extra=immutable("spec.region", "create a new PostgresCluster in the other region")
    )
    version: Literal[15] = Field(default=15, description="Postgres major version.")
    volume_size_gb: int = Field(default=10, ge=1, le=500, json_schema_extra=validations(VOLUME_GROWS_RULE))
    guest: Guest = Field(default_factory=Guest)
    synchronous: bool = Field(default=False, description="Commit only when a standby has the WAL too.")
    switchover_to: DnsLabel | None = Field(
        default=None, description="A request: make this member the primary (a planned switchover)."
    )
    backups: PostgresBackups = Field(default_factory=PostgresBackups)
    # Both rules on the field: a field's own x-kubernetes-validations replace its model's.
    restore: PostgresRestore | None = Field(
        default=None,
        json_schema_extra=validations(
            ONE_TARGET_RULE,
            *immutable("spec.restore", "create a new PostgresCluster to restore into")["x-kubernetes-validations"],
        ),
    )
    delete_policy: Literal["keepVolumes", "deleteVolumes"] = Field(
        default="keepVolumes",
        description="What happens to a member's Volume when the cluster is deleted or scaled down, or the member is replaced: keepVolumes keeps it (labelled retired), deleteVolumes deletes it.",
    )

    @model_validator(mode="after")
    def _synchronous_needs_a_standby(self):
        if self.synchronous and self.members < 2:
            raise ValueError(SYNCHRONOUS_RULE["message"])
        return self


class PostgresMember(ApiModel):
    name: str
    # The member's own /health role; unknown while its health port does not answer.
    role: Literal["primary", "standby", "fenced", "starting", "empty", "unknown"] = "unknown"
    host: str | None = None
    lag_bytes: int | None = Field(default=None, ge=0)
    timeline: int | None = Field(default=None, ge=0)
    ready: bool = False


class Failover(ApiModel):
    time: datetime
    reason: str = Field(max_length=1024)
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None


class RestoreStatus(ApiModel):
    from_: str = Field(alias="from")
    archive_path: str = Field(description="The source lineage's archive, read only.")
    backup: str | None = Field(default=None, description="The backup label restored.")
    type: Literal["time", "lsn", "name", "default"]
    target: str | None = None


class PostgresClusterStatus(StatusModel):
    phase: str | None = Field(default=None, description="A one-word summary for `kubectl get`; conditions tell the detail.")
    primary: str | None = None
    ready_members: int | None = Field(default=None, ge=0)
    members: list[PostgresMember] = Field(default_factory=list, max_length=16)
    timeline: int | None = Field(default=None, ge=0)
    last_failover: Failover | None = None
    credentials_secret: str | None = None
    archive_path: str | None = Field(
        default=None, description="Where the WAL archive and base backups are, under the object store's bucket."
    )
    restore: RestoreStatus | None = Field(default=None, description="What spec.restore was resolved to, once.")


class PostgresCluster(Resource):
    crd = CrdInfo(
        plural="postgresclusters",
        short_names=("pgc",),
        columns=(
            PrinterColumn("Members", ".spec.members", "integer"),
            PrinterColumn("Ready", ".status.readyMembers", "integer"),
            PrinterColumn("Primary", ".status.primary"),
            PrinterColumn("Phase", ".status.phase"),
            AGE,
        ),
        label_safe_name=True,
    )

    kind: Literal["PostgresCluster"] = "PostgresCluster"
    spec: PostgresClusterSpec
    status: PostgresClusterStatus | None = None
