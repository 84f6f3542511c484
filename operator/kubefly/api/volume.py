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

SIZE_GROWS_RULE = cel("self >= oldSelf", "spec.sizeGb may only grow: set it to at least its current value, or fork to a new Volume")
# A fork happens once, at create; changing or adding it later would mean nothing.
FORK_FROM_RULE = cel(
    "has(self.forkFrom) == has(oldSelf.forkFrom) && (!has(self.forkFrom) || self.forkFrom == oldSelf.forkFrom)",
    "spec.forkFrom is immutable: create a new Volume to fork another one",
    ".forkFrom",
)


class VolumeSpec(ApiModel):
    model_config = {"json_schema_extra": validations(FORK_FROM_RULE)}

    app: AppName = Field(json_schema_extra=immutable("spec.app", "create a new Volume in the other app"))
    region: RegionName = Field(json_schema_extra=immutable("spec.region", "fork the Volume into the other region"))
    size_gb: int = Field(default=1, ge=1, le=500, json_schema_extra=validations(SIZE_GROWS_RULE))
    snapshot_retention: int = Field(default=5, ge=1, le=60, description="Days to keep daily snapshots.")
    fork_from: DnsLabel | None = Field(default=None, description="Name of a Volume of the same app to copy at create.")


class VolumeStatus(StatusModel):
    host: str | None = Field(default=None, description="The host the volume is pinned to; it never moves by itself.")
    attached_machine: str | None = None
    persistent_volume: str | None = None
    claim: str | None = None


class Volume(Resource):
    crd = CrdInfo(
        plural="volumes",
        short_names=("vol",),
        columns=(
            PrinterColumn("App", ".spec.app"),
            PrinterColumn("Region", ".spec.region"),
            PrinterColumn("Size", ".spec.sizeGb", "integer", "Size in GB"),
            PrinterColumn("Host", ".status.host"),
            PrinterColumn("Attached", ".status.attachedMachine", description="The machine that mounts it"),
            AGE,
        ),
        label_safe_name=True,
    )

    kind: Literal["Volume"] = "Volume"
    spec: VolumeSpec
    status: VolumeStatus | None = None
