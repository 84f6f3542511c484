"""What a PostgresBackup does next, and when a cluster's scheduled backups are due: pure.

A backup runs on the cluster's writable primary (the member's POST /backup starts
pgBackRest in the background; its /health reports the run under archive.backup, keyed
by the PostgresBackup's uid). The operator asks once, then follows the member it asked,
which may stop being the primary meanwhile: pgBackRest then fails, and so does the
backup, with the member's reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from kubefly.api.postgresbackup import PostgresBackup
from kubefly.api.postgrescluster import PostgresCluster

TERMINAL = ("Completed", "Failed")
# pgBackRest's own bound on one backup (archiver.BACKUP_TIMEOUT_S) plus slack.
RUN_DEADLINE = timedelta(hours=6, minutes=10)


@dataclass(frozen=True)
class Step:
    action: Literal["start", "wait", "none"]
    member: str | None = None  # the member to ask (start) or to follow (wait)
    status: dict = field(default_factory=dict)  # status fields to write (camelCase)


def _failed(message: str, **extra) -> Step:
    return Step("none", status={"phase": "Failed", "message": message[:1024], **extra})


def step(backup: PostgresBackup, cluster: PostgresCluster | None, report: Mapping | None, *, now: datetime) -> Step:
    """`report`: archive.backup from the /health of the member followed (status.member, else the
    cluster's primary); None when that member did not answer."""
    status = backup.status
    phase = status.phase if status else None
    if phase in TERMINAL:
        return Step("none")
    name = backup.spec.cluster
    if cluster is None:
        return _failed(f"spec.cluster: there is no PostgresCluster {name} in namespace {backup.metadata.get('namespace')}: "
                       "create the backup of an existing cluster")
    cs = cluster.status
    if phase != "Running":
        archiving = next((c for c in (cs.conditions if cs else []) if c.type == "ContinuousArchiving"), None)
        if archiving is None or archiving.status != "True":
            why = archiving.message if archiving is not None else "its archive is not set up yet"
            return Step("wait", status={"phase": "Pending", "message": f"waiting for {name} to archive WAL: {why}"[:1024]})
        if not cs or not cs.primary:
            return Step("wait", status={"phase": "Pending", "message": f"waiting for a primary in {name}"})
        return Step("start", member=cs.primary)
    member = status.member
    mine = report if report and report.get("id") == backup.metadata.get("uid") else None
    if mine is None:
        if report is not None or (status.started_at and now - status.started_at > RUN_DEADLINE):
            return _failed(f"{member} no longer runs this backup (it restarted or was replaced): "
                           "create a new PostgresBackup")
        return Step("wait", member=member, status={"message": f"running on {member}; its health does not answer now"})
    if mine.get("state") == "running":
        return Step("wait", member=member, status={"message": f"running on {member}"})
    if mine.get("state") == "failed":
        return _failed(f"on {member}: {mine.get('error') or 'pgbackrest backup failed'}", finishedAt=mine.get("finished"))
    return Step("none", status={
        "phase": "Completed", "message": f"backup {mine.get('label')} taken on {member}",
        "label": mine.get("label"), "startedAt": mine.get("backup_started"), "finishedAt": mine.get("backup_finished"),
        "sizeBytes": mine.get("size_bytes"), "repoSizeBytes": mine.get("repo_size_bytes"),
        "walStart": mine.get("wal_start"), "walStop": mine.get("wal_stop"),
        "lsnStart": mine.get("lsn_start"), "lsnStop": mine.get("lsn_stop"),
    })


@dataclass(frozen=True)
class Scheduled:
    """A PostgresBackup the schedule made."""

    name: str
    created: datetime
    phase: str | None


def due(cluster: PostgresCluster, scheduled: Iterable[Scheduled], *, now: datetime, archiving: bool) -> str | None:
    """The name of the scheduled backup to create now, or None. The first comes as soon as the
    cluster archives; the next `intervalHours` after the newest, unless one is still unfinished."""
    spec = cluster.spec.backups
    if not spec.scheduled or not archiving:
        return None
    made = sorted(scheduled, key=lambda s: s.created)
    if made and (made[-1].phase not in TERMINAL or now - made[-1].created < timedelta(hours=spec.interval_hours)):
        return None
    stamp = f"{now:%Y%m%d-%H%M%S}"
    return f"{cluster.metadata['name'][:62 - len(stamp)]}-{stamp}"  # a name of at most 63


def expired(cluster: PostgresCluster, scheduled: Iterable[Scheduled], *, now: datetime) -> list[str]:
    """Scheduled records older than the recovery window plus one interval: pgBackRest has expired
    (or will at the next backup) what they describe. The newest completed one always stays."""
    spec = cluster.spec.backups
    horizon = now - timedelta(days=spec.recovery_window_days, hours=spec.interval_hours)
    made = sorted(scheduled, key=lambda s: s.created)
    completed = [s for s in made if s.phase == "Completed"]
    keep = completed[-1].name if completed else None
    return [s.name for s in made if s.created < horizon and s.name != keep and s.phase in TERMINAL]
