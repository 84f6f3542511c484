"""Snapshot: one copy of a Volume's data in the platform's object store.

Taken on the Volume's host by restic (incremental, deduplicated, encrypted)
into that Volume's own repository, so the copy outlives the host and, until
it expires, the Volume itself: a new Volume restores from it on any host of
the region (Volume spec.restoreFrom, spec.forkFrom). The kind is not called
VolumeSnapshot: that plural belongs to the CSI snapshot API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from kubefly.api.common import AGE, ApiModel, CrdInfo, DnsLabel, PrinterColumn, Resource, StatusModel, immutable

SnapshotPhase = Literal["Pending", "Running", "Succeeded", "Failed"]


class SnapshotSpec(ApiModel):
    volume: DnsLabel = Field(
        description="The Volume (in this namespace) to copy.",
        json_schema_extra=immutable("spec.volume", "create a new Snapshot of the other volume"),
    )
    retention_days: int | None = Field(
        default=None, ge=1, le=60,
        description="Days the copy is kept after it is taken; default: the Volume's spec.snapshotRetention.",
        json_schema_extra=immutable("spec.retentionDays", "create a new Snapshot"),
    )


class SnapshotStatus(StatusModel):
    phase: SnapshotPhase | None = None
    message: str | None = Field(default=None, description="What the snapshot is doing, or why it failed.")
    host: str | None = Field(default=None, description="The host the data was copied from.")
    volume_uid: str | None = Field(default=None, description="The uid of the Volume copied (the repository is that Volume's).")
    app: str | None = None
    region: str | None = None
    size_gb: int | None = Field(default=None, description="The Volume's spec.sizeGb when copied: a restore needs at least this.")
    repository: str | None = Field(default=None, description="The restic repository, relative to the store's bucket.")
    snapshot_id: str | None = Field(default=None, description="restic's id of the copy.")
    bytes: int | None = Field(default=None, ge=0, description="Bytes of data in the copy.")
    added_bytes: int | None = Field(default=None, ge=0, description="Bytes new to the repository (the rest was deduplicated).")
    files: int | None = Field(default=None, ge=0)
    duration_seconds: float | None = Field(default=None, ge=0)
    frozen_seconds: float | None = Field(default=None, ge=0, description="How long the Machine's processes were frozen for the consistent pass.")
    consistency: Literal["crash-consistent", "stopped", "live"] | None = Field(
        default=None,
        description="crash-consistent: taken while the Machine was frozen; stopped: no Machine ran; "
                    "live: read while running (files may be from different moments).",
    )
    started_at: datetime | None = None
    taken_at: datetime | None = Field(default=None, description="When the copy was complete.")
    expires_at: datetime | None = Field(default=None, description="When the copy is deleted (retention).")


class Snapshot(Resource):
    crd = CrdInfo(
        plural="snapshots",
        short_names=("snap",),
        columns=(
            PrinterColumn("Volume", ".spec.volume"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Host", ".status.host", description="The host the data came from"),
            PrinterColumn("Bytes", ".status.bytes", "integer"),
            PrinterColumn("Seconds", ".status.durationSeconds", "number", "How long the copy took"),
            PrinterColumn("Taken", ".status.takenAt", "date"),
            PrinterColumn("Expires", ".status.expiresAt", "date", priority=1),
            AGE,
        ),
        label_safe_name=True,
    )

    kind: Literal["Snapshot"] = "Snapshot"
    spec: SnapshotSpec
    status: SnapshotStatus | None = None
