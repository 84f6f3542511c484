"""PostgresBackup: one base backup of a PostgresCluster, taken by pgBackRest into the
cluster's archive in the platform's object store.

Made by a user (on demand) or by the operator (spec.backups of the cluster, labelled
kubefly.dev/scheduled). The object is the record; the backup itself lives in the archive
until the cluster's recovery window expires it, whether or not the object still exists.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from kubefly.api.common import AGE, ApiModel, CrdInfo, DnsLabel, PrinterColumn, Resource, StatusModel, immutable

BackupPhase = Literal["Pending", "Running", "Completed", "Failed"]


class PostgresBackupSpec(ApiModel):
    cluster: DnsLabel = Field(
        description="The PostgresCluster (in this namespace) to back up.",
        json_schema_extra=immutable("spec.cluster", "create a new PostgresBackup of the other cluster"),
    )
    type: Literal["full", "incr", "diff"] = Field(
        default="full",
        description="full: the whole database; incr: what changed since the last backup; diff: since the last full.",
        json_schema_extra=immutable("spec.type", "create a new PostgresBackup"),
    )


class PostgresBackupStatus(StatusModel):
    phase: BackupPhase | None = None
    message: str | None = Field(default=None, max_length=1024, description="What the backup is doing, or why it failed.")
    member: str | None = Field(default=None, description="The member it ran on.")
    label: str | None = Field(default=None, description="pgBackRest's label of the backup (restore's spec.restore.backup).")
    archive_path: str | None = Field(default=None, description="The archive it is in, relative to the store's bucket.")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    size_bytes: int | None = Field(default=None, ge=0, description="The database as a restore of it writes it.")
    repo_size_bytes: int | None = Field(default=None, ge=0, description="What it takes in the archive (compressed).")
    wal_start: str | None = Field(default=None, description="The first WAL segment a restore of it needs.")
    wal_stop: str | None = Field(default=None, description="The WAL segment that makes it consistent.")
    lsn_start: str | None = None
    lsn_stop: str | None = None


class PostgresBackup(Resource):
    crd = CrdInfo(
        plural="postgresbackups",
        short_names=("pgb",),
        columns=(
            PrinterColumn("Cluster", ".spec.cluster"),
            PrinterColumn("Type", ".spec.type"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Member", ".status.member"),
            PrinterColumn("Bytes", ".status.sizeBytes", "integer"),
            PrinterColumn("Finished", ".status.finishedAt", "date"),
            AGE,
        ),
        label_safe_name=True,
    )

    kind: Literal["PostgresBackup"] = "PostgresBackup"
    spec: PostgresBackupSpec
    status: PostgresBackupStatus | None = None
