"""Volume: a slice of one host's disk, a PersistentVolume + PVC pinned to that host."""

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
    PrinterColumn,
    RegionName,
    Resource,
    StatusModel,
    cel,
    immutable,
    validations,
)

SIZE_GROWS_RULE = cel("self >= oldSelf", "spec.sizeGb may only grow: set it to at least its current value")
ONE_SOURCE_RULE = cel(
    "!has(self.restoreFrom) || !has(self.forkFrom)",
    "spec.restoreFrom and spec.forkFrom are exclusive: a new Volume's data comes from one snapshot or one volume; remove one",
)
# A source is chosen when the Volume is made: set later, it would overwrite data the Volume already has.
SOURCE_AT_CREATION_RULE = cel(
    "has(self.restoreFrom) == has(oldSelf.restoreFrom) && has(self.forkFrom) == has(oldSelf.forkFrom)",
    "spec.restoreFrom and spec.forkFrom can only be set when a Volume is created: create a new Volume from the source",
)
SIZE_NOT_ENFORCED = "not enforced"


class VolumeSpec(ApiModel):
    model_config = {"json_schema_extra": validations(ONE_SOURCE_RULE, SOURCE_AT_CREATION_RULE)}

    app: AppName = Field(json_schema_extra=immutable("spec.app", "create a new Volume in the other app"))
    region: RegionName = Field(json_schema_extra=immutable("spec.region", "create a new Volume in the other region"))
    size_gb: int = Field(
        default=1, ge=1, le=500, json_schema_extra=validations(SIZE_GROWS_RULE),
        description="Size in GB, reserved on the host at placement. Not a limit: the data may grow past it (status.sizeLimit).",
    )
    snapshot_retention: int = Field(
        default=5, ge=1, le=60, description="Days each snapshot of this volume is kept (Fly's default: 5).",
    )
    scheduled_snapshots: bool = Field(default=True, description="Take a snapshot every snapshotIntervalHours.")
    snapshot_interval_hours: int = Field(
        default=24, ge=1, le=24, description="Hours between scheduled snapshots: 24 (daily, the default) down to 1 (hourly).",
    )
    restore_from: DnsLabel | None = Field(
        default=None, description="A Snapshot in this namespace whose data the new Volume starts with.",
        json_schema_extra=immutable("spec.restoreFrom", "create a new Volume from the other snapshot"),
    )
    fork_from: DnsLabel | None = Field(
        default=None,
        description="A Volume in this namespace to copy: a new snapshot of it if its host is up, else its newest stored one.",
        json_schema_extra=immutable("spec.forkFrom", "create a new Volume from the other volume"),
    )
    require_unique_host: bool = Field(
        default=True, description="A fork is placed on another host than its source (Fly's require_unique_zone).",
    )

    @model_validator(mode="after")
    def _one_source(self):
        if self.restore_from and self.fork_from:
            raise ValueError(ONE_SOURCE_RULE["message"])
        return self


class RestoredFrom(ApiModel):
    snapshot: str = Field(description="The Snapshot whose copy the data came from.")
    volume: str | None = Field(default=None, description="The Volume that copy was taken of.")
    taken_at: datetime | None = Field(default=None, description="When the copy was taken: the data's age.")
    data_age_seconds: int | None = Field(default=None, ge=0, description="How old the data was when restored.")
    bytes: int | None = Field(default=None, ge=0)
    duration_seconds: float | None = Field(default=None, ge=0)


MigrationPhase = Literal["Copying", "Stopping", "Syncing", "Switching", "Cleaning", "Aborting"]


class Migration(ApiModel):
    """A move of the volume (and its machine) to another host, under way (kubefly.volumes.migration)."""

    source: str = Field(description="The host the data leaves.")
    target: str = Field(description="The host the data goes to.")
    phase: MigrationPhase = Field(description="Copying (machine runs), Stopping, Syncing (the delta), Switching "
                                              "(the claim moves), Cleaning (old copy wiped; machine starts), Aborting.")
    started_at: datetime
    stopped_at: datetime | None = Field(default=None, description="When the machine was asked to stop for the last copy.")
    first_copy: str | None = Field(default=None, description="restic id of the copy made while running.")
    final_copy: str | None = Field(default=None, description="restic id of the copy made stopped.")
    reason: str | None = Field(default=None, description="Why it is aborting.")
    source_path: str | None = Field(default=None, description="The volume's directory on the source host.")


class MigrationRecord(ApiModel):
    source: str
    target: str
    started_at: datetime
    finished_at: datetime
    downtime_seconds: float | None = Field(default=None, ge=0,
                                           description="From the machine asked to stop to its claim on the new host.")


class VolumeStatus(StatusModel):
    host: str | None = Field(default=None, description="The host the volume is pinned to; it never moves by itself.")
    attached_machine: str | None = None
    persistent_volume: str | None = None
    claim: str | None = None
    path: str | None = Field(default=None, description="The directory on the host that holds the data; wiped when the Volume is deleted.")
    restored_from: RestoredFrom | None = Field(default=None, description="Where the data came from, for a restore or fork.")
    last_snapshot: str | None = Field(default=None, description="The newest Snapshot taken on schedule.")
    last_snapshot_at: datetime | None = None
    next_snapshot_at: datetime | None = Field(default=None, description="When the next scheduled snapshot is due.")
    migration: Migration | None = Field(default=None, description="A move to another host under way.")
    last_migration: MigrationRecord | None = None
    size_limit: Literal["not enforced"] | None = Field(
        default=None,
        description="Whether spec.sizeGb bounds the data: 'not enforced', the directory can grow until the host's disk is full.",
    )


class Volume(Resource):
    crd = CrdInfo(
        plural="volumes",
        short_names=("vol",),
        columns=(
            PrinterColumn("App", ".spec.app"),
            PrinterColumn("Region", ".spec.region"),
            PrinterColumn("Size", ".spec.sizeGb", "integer", "Size in GB, reserved on the host"),
            PrinterColumn("Limit", ".status.sizeLimit", description="Whether the size bounds the data (not enforced yet)"),
            PrinterColumn("Host", ".status.host"),
            PrinterColumn("Attached", ".status.attachedMachine", description="The machine that mounts it"),
            PrinterColumn("Migrating", ".status.migration.phase", priority=1, description="A move to another host"),
            AGE,
        ),
        label_safe_name=True,
    )

    kind: Literal["Volume"] = "Volume"
    spec: VolumeSpec
    status: VolumeStatus | None = None
