"""What a PostgresCluster's spec.restore means: which archive, which backup, which target; pure.

The source may be deleted: its completed PostgresBackups (records that outlive it) say where
its archive is and what it holds. The recovery window is what those backups cover: a target
before the first of them finished, or in the future, has nothing to restore to, and is refused
naming the field. Once resolved, the answer is kept in status.restore, so the members' spec
never changes under them even if the records go later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from kubefly.api.postgresbackup import PostgresBackup
from kubefly.api.postgrescluster import PostgresCluster, RestoreStatus
from kubefly.postgres import pgbackrest as pb

# pgBackRest records a backup's stop time to the second: a time target must be past that second.
STOP_RESOLUTION = timedelta(seconds=1)


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


def from_status(status: RestoreStatus) -> pb.RestoreFrom:
    system_id = status.archive_path.rstrip("/").rsplit("/", 1)[1]
    return pb.RestoreFrom(cluster=status.from_, system_id=system_id, type=status.type, target=status.target,
                          backup_set=status.backup)


def resolve(cluster: PostgresCluster, backups: Iterable[PostgresBackup], *, now: datetime) -> RestoreStatus | Refusal:
    """`backups`: the PostgresBackups of the namespace (those of other clusters are ignored)."""
    r = cluster.spec.restore
    name, source = cluster.metadata["name"], r.from_
    if source == name:
        return Refusal("InvalidRestore", f"spec.restore.from names this cluster ({name}): a restore starts a new "
                                         "cluster with its own archive; name the cluster to restore from")
    done = sorted((b for b in backups if b.spec.cluster == source and b.status and b.status.phase == "Completed"
                   and b.status.archive_path and b.status.finished_at and b.status.label),
                  key=lambda b: b.status.finished_at)
    if not done:
        return Refusal("NoBackup", f"spec.restore.from: {source} has no completed PostgresBackup in this namespace, "
                                   "and a restore starts from one: back it up first, or name another cluster")
    if r.backup is not None:
        chosen = [b for b in done if b.status.label == r.backup]
        if not chosen:
            return Refusal("NoBackup", f"spec.restore.backup: {source} has no completed backup {r.backup} "
                                       f"(it has {', '.join(b.status.label for b in done[-5:])})")
        done = chosen
    if r.target_time is not None:
        at = r.target_time
        if at > now:
            return Refusal("TargetOutsideWindow", f"spec.restore.targetTime {at.isoformat()} is in the future: "
                                                  "name a time that has happened")
        usable = [b for b in done if b.status.finished_at + STOP_RESOLUTION <= at]
        if not usable:
            first = done[0].status.finished_at
            return Refusal("TargetOutsideWindow",
                           f"spec.restore.targetTime {at.isoformat()} is before the recovery window of {source}: "
                           f"its {'backup' if r.backup else 'oldest backup'} finished at {first.isoformat()}, "
                           f"so the earliest time to restore to is {(first + STOP_RESOLUTION).isoformat()}")
        chosen, kind, target = usable[-1], "time", pb.format_time(at)
    elif r.target_lsn is not None:
        want = _lsn(r.target_lsn)
        usable = [b for b in done if b.status.lsn_stop and _lsn(b.status.lsn_stop) <= want]
        if not usable:
            return Refusal("TargetOutsideWindow", f"spec.restore.targetLSN {r.target_lsn} is before every backup of "
                                                  f"{source} ended (the first ends at {done[0].status.lsn_stop})")
        chosen, kind, target = usable[-1], "lsn", r.target_lsn
    elif r.target_name is not None:
        chosen, kind, target = done[-1], "name", r.target_name
    else:
        chosen, kind, target = done[-1], "default", None
    return RestoreStatus.model_validate({"from": source, "archivePath": chosen.status.archive_path,
                                         "backup": chosen.status.label, "type": kind, "target": target})


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)
