"""Continuous WAL archiving for one member, with pgBackRest, to the platform's object store.

Every member renders the same pgbackrest.conf and runs postgres with archive_mode on
and pgBackRest's archive-push as archive_command: only a primary archives (a standby
with archive_mode on does nothing), so after a failover the new primary carries on in
the same archive with no step of ours. The primary creates the stanza (idempotent)
once per promotion; until then archive-push fails and postgres keeps the segments and
retries.

Each database lineage archives under `<path>/<cluster>/<system identifier>`: a cluster
re-created empty under the same name gets a new system identifier and so a new archive,
instead of pgBackRest refusing the old one ("does not match the database"), and a kept
Volume adopted by a re-created cluster continues its own.

The member reports what pg_stat_archiver and pg_wal/archive_status say on /health
(`archive`), the operator turns that into the ContinuousArchiving condition.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import Gauge

from kubefly import logs
from kubefly.postgres import pgbackrest as pb
from kubefly.postgres.repmgr import Layout

log = logs.get("kubefly.postgres.archiver")

PENDING = Gauge("kubefly_postgres_wal_archive_pending_segments",
                "WAL segments complete on the primary and not yet in the archive")
ARCHIVED_AGE = Gauge("kubefly_postgres_last_archived_wal_age_seconds",
                     "Seconds since the primary last archived a WAL segment (0: never)")
FAILED = Gauge("kubefly_postgres_wal_archive_failed_total",
               "archive-push failures since postgres started (pg_stat_archiver.failed_count)")

SECRET_KEY_ENV = "KUBEFLY_PG_ARCHIVE_SECRET_KEY"
# A segment is switched at most this often when there were writes: the bound on what a
# loss of every member and volume loses (RPO), at up to 16 MiB (mostly zeros, lz4) per switch.
ARCHIVE_TIMEOUT_S = 5
STANZA_RETRY_S = 15.0
BACKUP_TIMEOUT_S = 6 * 3600
# Days a backup and its WAL stay at least, unless a backup request says otherwise (the
# cluster's spec.backups.recoveryWindowDays, which the operator sends with each request).
DEFAULT_RECOVERY_WINDOW_DAYS = 7

_STATUS_SQL = """
SELECT archived_count, last_archived_wal, last_archived_time, failed_count, last_failed_wal, last_failed_time
FROM pg_stat_archiver
"""


@dataclass(frozen=True)
class Settings:
    """Where this cluster archives (the operator's env for the member)."""

    endpoint: str  # https://host[:port]
    bucket: str
    path_prefix: str  # /postgres/<namespace>: the cluster's archives are under <prefix>/<cluster>
    cluster: str  # the stanza
    access_key_id: str
    region: str = "us-east-1"
    ca_pem: str | None = None  # a private CA (the bundled store's); None: the system's trust

    def repository(self, ca_file: Path | None) -> pb.Repository:
        return pb.Repository(endpoint=self.endpoint, bucket=self.bucket, access_key_id=self.access_key_id,
                             region=self.region or "us-east-1", secret_key_env=SECRET_KEY_ENV,
                             path_prefix=self.path_prefix, ca_file=ca_file,
                             retention_full=DEFAULT_RECOVERY_WINDOW_DAYS, retention_full_type="time")


@dataclass
class BackupRun:
    """One base backup this member was asked for (by the PostgresBackup whose uid is `id`)."""

    id: str
    type: pb.BackupType
    retention_days: int
    started: datetime
    state: str = "running"  # running | completed | failed
    finished: datetime | None = None
    error: str | None = None
    result: dict = field(default_factory=dict)  # the backup as `info` lists it

    def report(self) -> dict:
        return {"id": self.id, "type": self.type, "state": self.state, "started": _iso(self.started),
                "finished": _iso(self.finished), "error": self.error, **self.result}


class BackupBusy(RuntimeError):
    pass


class Archiver:
    """The member's archiving: files, postgres settings, the stanza, and the status it reports."""

    def __init__(self, settings: Settings, layout: Layout, pg_port: int, socket_dir: Path,
                 run: Callable[..., Awaitable[str]], environ: dict[str, str],
                 restore_from: pb.RestoreFrom | None = None) -> None:
        self.settings = settings
        self.restore_from = restore_from
        self.restore_report: dict | None = None
        self.layout = layout
        self.pg_port = pg_port
        self.socket_dir = socket_dir
        self._run = run  # the member's run_cmd: as the postgres user, with its environment
        self._ca_file = layout.root / "pgbackrest-ca.crt" if settings.ca_pem else None
        self.repo = settings.repository(self._ca_file)
        self.env = pb.environment(self.repo, environ)  # raises when the secret key is missing
        self.member = pb.Member(settings.cluster, layout, pg_port, socket_dir)
        self.stanza_ok = False
        self.stanza_error: str | None = None
        self._stanza_task: asyncio.Task | None = None
        self._stanza_tried_at = 0.0
        self.last: dict | None = None
        self.backup_run: BackupRun | None = None
        self._backup_task: asyncio.Task | None = None

    def prepare(self, write: Callable[[Path, str], None], chown: Callable[[Path], None]) -> None:
        for d in self.member.directories():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            chown(d)
        if self._ca_file is not None:
            write(self._ca_file, self.settings.ca_pem)

    def configure(self, write: Callable[[Path, str], None], system_id: str | None) -> None:
        """pgbackrest.conf for the data now in pgdata (its system identifier names the archive)."""
        if system_id and system_id != self.member.system_id:
            self.member = dataclasses.replace(self.member, system_id=system_id)
            self.stanza_ok = False  # another lineage: its stanza is created afresh
        write(self.member.config, pb.render_conf(self.repo, self.member))

    async def restore_files(self, write: Callable[[Path, str], None]) -> None:
        """pgBackRest restore of the source's backup into this member's (empty) pgdata, with the
        recovery settings that replay the source's WAL to the target and then promote. Reads only:
        the source's archive is in another file, and this cluster's key may only read it."""
        src = self.restore_from
        member = pb.Member(src.cluster, self.layout, self.pg_port, self.socket_dir, system_id=src.system_id,
                           config_name="restore-source.conf")
        write(member.config, pb.render_conf(self.repo, member))
        await self._run(pb.restore(member, src.type, src.target, target_action="promote", backup_set=src.backup_set),
                        timeout=BACKUP_TIMEOUT_S)

    def pg_settings(self) -> dict[str, str]:
        command = pb.archive_command(self.member).replace("'", "''")
        return {"archive_mode": "on", "archive_command": f"'{command}'", "archive_timeout": f"'{ARCHIVE_TIMEOUT_S}s'"}

    @property
    def archive_path(self) -> str:
        return self.repo.path_for(self.settings.cluster, self.member.system_id)

    def promoted(self) -> None:
        """This member became (or started as) the primary: make sure the stanza exists."""
        self.stanza_ok = False
        self._stanza_tried_at = 0.0

    def tend(self, *, primary: bool) -> None:
        """From the supervision loop: on the primary, create the stanza in the background until it exists."""
        if not primary or self.stanza_ok or self.member.system_id is None:
            return
        if self._stanza_task is not None and not self._stanza_task.done():
            return
        if time.monotonic() - self._stanza_tried_at < STANZA_RETRY_S:
            return
        self._stanza_tried_at = time.monotonic()
        self._stanza_task = asyncio.create_task(self._create_stanza())

    async def _create_stanza(self) -> None:
        try:
            await self._run(pb.stanza_create(self.member), timeout=120)
        except Exception as exc:  # noqa: BLE001 - reported on /health; retried after STANZA_RETRY_S
            self.stanza_error = f"pgbackrest stanza-create failed: {exc} (see {self.member.log_dir})"
            log.warning("stanza-create failed", error=str(exc), path=self.archive_path)
            return
        self.stanza_ok, self.stanza_error = True, None
        log.info("stanza ready", stanza=self.settings.cluster, path=self.archive_path)

    def start_backup(self, run_id: str, kind: pb.BackupType, retention_days: int) -> BackupRun:
        """Begins a base backup in the background (the caller checked this member is the primary)."""
        if self.backup_run is not None and self.backup_run.id == run_id:
            return self.backup_run  # asked again (the operator retried): the same run
        if self._backup_task is not None and not self._backup_task.done():
            raise BackupBusy(f"backup {self.backup_run.id} is still running")
        if not self.stanza_ok:
            raise BackupBusy(f"the archive {self.archive_path} is not ready yet ({self.stanza_error or 'creating'})")
        self.backup_run = BackupRun(run_id, kind, retention_days, datetime.now(UTC))
        self._backup_task = asyncio.create_task(self._backup(self.backup_run))
        return self.backup_run

    async def _backup(self, run: BackupRun) -> None:
        try:
            before = {b.label for b in await self._backups()}
            await self._run(pb.backup(self.member, run.type, retention_full=run.retention_days), timeout=BACKUP_TIMEOUT_S)
            made = [b for b in await self._backups() if b.label not in before]
            if not made:
                raise RuntimeError("pgbackrest backup succeeded but info lists no new backup")
            b = made[-1]
            run.result = {"label": b.label, "backup_started": _iso(b.started), "backup_finished": _iso(b.finished),
                          "size_bytes": b.size_bytes, "repo_size_bytes": b.repo_size_bytes,
                          "wal_start": b.wal_start, "wal_stop": b.wal_stop, "lsn_start": b.lsn_start,
                          "lsn_stop": b.lsn_stop}
            run.state = "completed"
            log.info("backup completed", id=run.id, label=b.label, size_bytes=b.size_bytes)
        except Exception as exc:  # noqa: BLE001 - the PostgresBackup's status says why
            run.state, run.error = "failed", f"{type(exc).__name__}: {exc}"[:1000]
            log.warning("backup failed", id=run.id, error=run.error)
        finally:
            run.finished = datetime.now(UTC)

    async def _backups(self) -> list[pb.BackupInfo]:
        stanzas = pb.parse_info(await self._run(pb.info(self.member), timeout=120))
        return [b for s in stanzas for b in s.backups]

    async def observe(self, conn, *, primary: bool, now: datetime) -> dict:
        """What /health says of archiving (`conn`: the member's autocommit connection)."""
        report: dict = {"path": self.archive_path, "stanza": "ready" if self.stanza_ok else
                        ("failed" if self.stanza_error else "pending"), "error": self.stanza_error,
                        "backup": self.backup_run.report() if self.backup_run is not None else None}
        if primary:
            row = await (await conn.execute(_STATUS_SQL)).fetchone()
            archived, last_wal, last_at, failed, failed_wal, failed_at = row
            report.update(archived_count=archived, last_archived_wal=last_wal,
                          last_archived_age_s=_age(last_at, now), failed_count=failed,
                          last_failed_wal=failed_wal, last_failed_age_s=_age(failed_at, now),
                          pending_segments=self.pending_segments())
            PENDING.set(report["pending_segments"])
            ARCHIVED_AGE.set(report["last_archived_age_s"] or 0)
            FAILED.set(failed)
        self.last = report
        return report

    def pending_segments(self) -> int:
        status = self.layout.pgdata / "pg_wal" / "archive_status"
        try:
            return sum(1 for p in status.iterdir() if p.name.endswith(".ready"))
        except OSError:
            return 0


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(at: datetime | None, now: datetime) -> float | None:
    return None if at is None else round(max(0.0, (now - at).total_seconds()), 1)
