"""Volume: a slice of one host's disk, a PersistentVolume + PVC pinned to that host."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
# Snapshots and forks are not built yet (issue 13): a field nothing acts on is
# refused, never silently accepted. The rule sits on the field itself, so the API
# server's validation ratcheting still lets Volumes stored before this rule (when
# snapshotRetention defaulted to 5) be updated as long as the value is unchanged;
# for the same reason it is not a pydantic validator: the operator must keep
# reconciling those Volumes.
SNAPSHOT_RETENTION_RULE = cel(
    "false", "spec.snapshotRetention is not implemented yet: kubefly takes no snapshots; remove the field"
)
FORK_FROM_RULE = cel(
    "false",
    "spec.forkFrom is not implemented yet: kubefly cannot copy a Volume, and a fork would start empty; remove the field",
)
SIZE_NOT_ENFORCED = "not enforced"


class VolumeSpec(ApiModel):
    app: AppName = Field(json_schema_extra=immutable("spec.app", "create a new Volume in the other app"))
    region: RegionName = Field(json_schema_extra=immutable("spec.region", "create a new Volume in the other region"))
    size_gb: int = Field(
        default=1, ge=1, le=500, json_schema_extra=validations(SIZE_GROWS_RULE),
        description="Size in GB, reserved on the host at placement. Not a limit: the data may grow past it (status.sizeLimit).",
    )
    snapshot_retention: int | None = Field(
        default=None, description="Not implemented yet: refused by the API server.",
        json_schema_extra=validations(SNAPSHOT_RETENTION_RULE),
    )
    fork_from: DnsLabel | None = Field(
        default=None, description="Not implemented yet: refused by the API server.", json_schema_extra=validations(FORK_FROM_RULE),
    )


class VolumeStatus(StatusModel):
    host: str | None = Field(default=None, description="The host the volume is pinned to; it never moves by itself.")
    attached_machine: str | None = None
    persistent_volume: str | None = None
    claim: str | None = None
    path: str | None = Field(default=None, description="The directory on the host that holds the data; wiped when the Volume is deleted.")
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
            AGE,
        ),
        label_safe_name=True,
    )

    kind: Literal["Volume"] = "Volume"
    spec: VolumeSpec
    status: VolumeStatus | None = None
