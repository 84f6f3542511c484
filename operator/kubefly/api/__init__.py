"""The kubefly API: pydantic models of every custom resource (the schema source)."""

from kubefly.api.appsecret import AppSecret, AppSecretSpec, AppSecretStatus
from kubefly.api.machine import Machine, MachineSpec, MachineState, MachineStatus
from kubefly.api.postgresbackup import PostgresBackup, PostgresBackupSpec, PostgresBackupStatus
from kubefly.api.postgrescluster import PostgresCluster, PostgresClusterSpec, PostgresClusterStatus
from kubefly.api.snapshot import Snapshot, SnapshotSpec, SnapshotStatus
from kubefly.api.volume import Volume, VolumeSpec, VolumeStatus

# Every kind, in the order the CRDs are written and documented.
KINDS = (Machine, Volume, Snapshot, AppSecret, PostgresCluster, PostgresBackup)

__all__ = [
    "KINDS",
    "AppSecret",
    "AppSecretSpec",
    "AppSecretStatus",
    "Machine",
    "MachineSpec",
    "MachineState",
    "MachineStatus",
    "PostgresBackup",
    "PostgresBackupSpec",
    "PostgresBackupStatus",
    "PostgresCluster",
    "PostgresClusterSpec",
    "PostgresClusterStatus",
    "Snapshot",
    "SnapshotSpec",
    "SnapshotStatus",
    "Volume",
    "VolumeSpec",
    "VolumeStatus",
]
