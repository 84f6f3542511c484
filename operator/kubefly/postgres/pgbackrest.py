"""pgBackRest for a Postgres member: its pgbackrest.conf, the argv of each command, and what
`info --output=json` says about backups, for WAL archiving and base backups to the
platform's S3-compatible object store.

Pure like repmgr.py: strings and lists in, strings and lists out. The S3 credentials are
never in the rendered file nor in any argv: pgBackRest reads them from
PGBACKREST_REPO1_S3_KEY and PGBACKREST_REPO1_S3_KEY_SECRET, which `environment()` builds
for the processes that need them (postgres itself, whose archive_command runs
archive-push, and every command below).

pgBackRest 2.45 (Debian bookworm) speaks S3 only over HTTPS; bare HTTP endpoints arrived in
2.58. A `Repository` therefore refuses an http:// endpoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from kubefly.postgres.repmgr import Layout

PGBACKREST = "pgbackrest"
KEY_ENV = "PGBACKREST_REPO1_S3_KEY"
SECRET_ENV = "PGBACKREST_REPO1_S3_KEY_SECRET"

BackupType = Literal["full", "incr", "diff"]
# default: replay all the WAL in the archive (a restore to the latest commit).
RestoreType = Literal["time", "lsn", "name", "immediate", "default"]

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a Kubernetes name (DNS label)


@dataclass(frozen=True)
class Repository:
    """An S3 bucket (or a prefix in one) holding one archive per cluster."""

    endpoint: str  # https://host[:port]
    bucket: str
    access_key_id: str
    region: str = "us-east-1"  # signed into every request; most S3-compatible stores accept any
    # Exactly one of these holds the secret access key, read when the environment is built.
    secret_key_file: Path | None = None
    secret_key_env: str | None = None
    path_prefix: str = "/postgres"  # each cluster archives under <prefix>/<cluster>
    verify_tls: bool = True
    ca_file: Path | None = None  # a private CA, e.g. the bundled store's
    # Full backups kept (count), or days a full backup stays (time: the recovery window; pgBackRest
    # keeps one full at least that old). Older ones and the WAL only they need expire after a backup.
    retention_full: int = 2
    retention_full_type: Literal["count", "time"] = "count"

    def __post_init__(self) -> None:
        url = urlsplit(self.endpoint)
        if url.scheme != "https":
            raise ValueError(f"endpoint {self.endpoint!r}: pgBackRest 2.45 reaches S3 only over https://")
        if not url.hostname or url.path not in ("", "/") or url.query or url.username:
            raise ValueError(f"endpoint {self.endpoint!r}: expected https://host[:port] and nothing else")
        try:
            url.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"endpoint {self.endpoint!r}: {exc}") from None
        if not self.bucket:
            raise ValueError("bucket is empty")
        if (self.secret_key_file is None) == (self.secret_key_env is None):
            raise ValueError("exactly one of secret_key_file and secret_key_env names the secret key")
        if not self.path_prefix.startswith("/") or any(c.isspace() for c in self.path_prefix):
            raise ValueError(f"path_prefix {self.path_prefix!r}: an absolute path without spaces")
        if self.retention_full < 1:
            raise ValueError(f"retention_full {self.retention_full}: at least 1")
        if self.retention_full_type not in ("count", "time"):
            raise ValueError(f"retention_full_type {self.retention_full_type!r}: count or time")

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.endpoint).port or 443

    def path_for(self, cluster: str, system_id: str | None = None) -> str:
        """A cluster's archive; with `system_id`, that of one database lineage in it."""
        base = f"{self.path_prefix.rstrip('/')}/{cluster}"
        return f"{base}/{system_id}" if system_id else base


@dataclass(frozen=True)
class Member:
    """The member pgBackRest works for: its cluster (the stanza) and where its files are."""

    cluster: str
    layout: Layout
    pg_port: int
    socket_dir: Path  # unix_socket_directories of its postgres
    system_id: str | None = None  # pg_controldata's; when set, the archive is that lineage's own
    config_name: str = "pgbackrest.conf"  # another name for another archive (a restore's source)

    def __post_init__(self) -> None:
        if not _NAME.match(self.cluster):
            raise ValueError(f"cluster {self.cluster!r}: not a valid name for a stanza")
        if self.system_id is not None and not self.system_id.isdigit():
            raise ValueError(f"system_id {self.system_id!r}: the database system identifier is a number")

    @property
    def base(self) -> Path:
        """pgBackRest's own files, on the member's volume beside pgdata (never inside it:
        a base backup would copy them)."""
        return self.layout.root / "pgbackrest"

    @property
    def config(self) -> Path:
        return self.base / self.config_name

    @property
    def spool(self) -> Path:
        return self.base / "spool"

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    @property
    def lock_dir(self) -> Path:
        return self.base / "lock"

    def directories(self) -> tuple[Path, ...]:
        """To create (mode 0700, owned by the postgres user) before any command: pgBackRest
        does not make its log path (it runs on without a log file)."""
        return (self.base, self.log_dir, self.lock_dir, self.spool)


@dataclass(frozen=True)
class RestoreFrom:
    """Start this cluster from another's archive (PostgresCluster spec.restore, resolved by the operator)."""

    cluster: str  # the source's stanza, in the same namespace (the same path prefix)
    system_id: str  # the source lineage
    type: RestoreType
    target: str | None = None
    backup_set: str | None = None  # a backup label; None: pgBackRest picks the newest usable one

    @property
    def describe(self) -> str:
        to = "the end of its archive" if self.type == "default" else f"{self.type} {self.target}"
        return f"{self.cluster}'s archive {self.system_id} to {to}"


def render_conf(repo: Repository, member: Member, *, process_max: int = 2) -> str:
    """pgbackrest.conf for one member: one stanza named after the cluster, one S3 repository."""
    if process_max < 1:
        raise ValueError(f"process_max {process_max}: at least 1")
    glob = {
        "repo1-type": "s3",
        "repo1-s3-endpoint": repo.host,
        "repo1-storage-port": str(repo.port),
        "repo1-s3-bucket": repo.bucket,
        "repo1-s3-region": repo.region,
        # Virtual-host style would put the bucket in the host name (bucket.127.0.0.1).
        "repo1-s3-uri-style": "path",
        "repo1-path": repo.path_for(member.cluster, member.system_id),
        "repo1-storage-verify-tls": "y" if repo.verify_tls else "n",
        **({"repo1-storage-ca-file": str(repo.ca_file)} if repo.ca_file else {}),
        "repo1-retention-full-type": repo.retention_full_type,
        "repo1-retention-full": str(repo.retention_full),
        # archive-push acknowledges a segment once pushed, but pushes ahead in parallel
        # from the spool; archive-get prefetches the same way during recovery.
        "archive-async": "y",
        "spool-path": str(member.spool),
        "process-max": str(process_max),
        "compress-type": "lz4",
        "start-fast": "y",  # a backup starts with an immediate checkpoint, not a spread one
        "delta": "y",  # restore over existing files by checksum
        "log-path": str(member.log_dir),
        "lock-path": str(member.lock_dir),
        "log-level-console": "warn",
        "log-level-file": "info",
    }
    stanza = {
        "pg1-path": str(member.layout.pgdata),
        "pg1-port": str(member.pg_port),
        "pg1-socket-path": str(member.socket_dir),
    }
    lines = ["# written by kubefly; the S3 credentials come from the environment", "[global]"]
    lines += [f"{k}={v}" for k, v in glob.items()]
    lines += ["", f"[{member.cluster}]"]
    lines += [f"{k}={v}" for k, v in stanza.items()]
    for value in (*glob.values(), *stanza.values()):
        if "\n" in value:
            raise ValueError(f"a pgbackrest.conf value holds a newline: {value!r}")
    return "\n".join(lines) + "\n"


def environment(repo: Repository, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that give pgBackRest the S3 credentials (merge into a process's env)."""
    environ = os.environ if environ is None else environ
    if repo.secret_key_file is not None:
        secret = repo.secret_key_file.read_text().strip()
    else:
        secret = environ.get(repo.secret_key_env or "", "")
    if not secret:
        raise ValueError(f"the S3 secret key is empty (from {repo.secret_key_file or '$' + str(repo.secret_key_env)})")
    return {KEY_ENV: repo.access_key_id, SECRET_ENV: secret}


def _base(member: Member) -> list[str]:
    return [PGBACKREST, f"--config={member.config}", f"--stanza={member.cluster}"]


def stanza_create(member: Member) -> list[str]:
    return [*_base(member), "stanza-create"]


def check(member: Member) -> list[str]:
    """Confirms archive_command reaches the repository (forces a WAL switch and waits)."""
    return [*_base(member), "check"]


def backup(member: Member, kind: BackupType = "full", *, retention_full: int | None = None) -> list[str]:
    """`retention_full` overrides the file's (days with time retention): what expires after this backup."""
    if kind not in ("full", "incr", "diff"):
        raise ValueError(f"backup type {kind!r}: full, incr or diff")
    if retention_full is not None and retention_full < 1:
        raise ValueError(f"retention_full {retention_full}: at least 1")
    keep = [f"--repo1-retention-full={retention_full}"] if retention_full is not None else []
    return [*_base(member), f"--type={kind}", *keep, "backup"]


def archive_command(member: Member) -> str:
    """postgresql.conf's archive_command (a shell command line; %p is the segment's path)."""
    return shlex.join(_base(member)) + " archive-push %p"


def info(member: Member) -> list[str]:
    return [*_base(member), "--output=json", "info"]


def restore(member: Member, kind: RestoreType, target: str | None = None, *,
            target_action: Literal["promote", "pause", "shutdown"] = "promote",
            backup_set: str | None = None) -> list[str]:
    """Restores the member's stanza into the member's (empty or stale) pgdata and leaves
    recovery settings for `kind` at `target`; `kind="immediate"` stops at the backup's end.
    Reading from another cluster's archive is the caller's choice of `member.cluster`."""
    if kind not in ("time", "lsn", "name", "immediate", "default"):
        raise ValueError(f"restore type {kind!r}: time, lsn, name, immediate or default")
    if (kind in ("immediate", "default")) != (target is None):
        raise ValueError(f"restore --type={kind}: " + ("takes no target" if target is not None else "needs a target"))
    if kind == "lsn" and not re.fullmatch(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", target or ""):
        raise ValueError(f"target {target!r}: an LSN is XXXXXXXX/XXXXXXXX")
    if kind == "time":
        _check_time(target or "")
    argv = [*_base(member), f"--type={kind}"]
    if target is not None:
        argv.append(f"--target={target}")
    if kind != "default":  # without a target, recovery ends at the archive's end and promotes anyway
        argv.append(f"--target-action={target_action}")
    if backup_set is not None:
        argv.append(f"--set={backup_set}")
    return [*argv, "restore"]


def _check_time(target: str) -> None:
    """pgBackRest hands the target to Postgres; a zone is required so it means one instant."""
    try:
        parsed = datetime.fromisoformat(target)
    except ValueError:
        raise ValueError(f"target {target!r}: a timestamp like 2026-01-02 03:04:05.678+00") from None
    if parsed.tzinfo is None:
        raise ValueError(f"target {target!r}: the timestamp needs a time zone offset")


def format_time(at: datetime) -> str:
    """A recovery target from an aware datetime, in the form Postgres parses (UTC)."""
    if at.tzinfo is None:
        raise ValueError("a naive datetime is no instant: give it a time zone")
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


@dataclass(frozen=True)
class BackupInfo:
    """One backup in the repository, as a PostgresBackup status will show it."""

    label: str
    type: str  # full, incr, diff
    started: datetime
    finished: datetime
    size_bytes: int  # the database as restored
    repo_size_bytes: int  # what it takes in the repository (compressed, incremental)
    wal_start: str  # first WAL segment a restore of it needs
    wal_stop: str  # the segment that makes it consistent
    lsn_start: str = ""
    lsn_stop: str = ""


@dataclass(frozen=True)
class StanzaInfo:
    name: str
    status_code: int  # 0 = ok, 2 = no backups yet, others are errors
    status_message: str
    backups: tuple[BackupInfo, ...]
    wal_min: str  # oldest and newest archived segment of the current database ("" when none)
    wal_max: str


def parse_info(text: str) -> list[StanzaInfo]:
    """`pgbackrest info --output=json`: one entry per stanza, backups oldest first. Log lines
    before the JSON (a warning on the same stream) are skipped."""
    start = 0 if text.lstrip().startswith("[") else text.find("\n[") + 1
    entries, _ = json.JSONDecoder().raw_decode(text[start:].lstrip())
    stanzas = []
    for entry in entries:
        backups = tuple(
            BackupInfo(
                label=b["label"],
                type=b["type"],
                started=datetime.fromtimestamp(b["timestamp"]["start"], UTC),
                finished=datetime.fromtimestamp(b["timestamp"]["stop"], UTC),
                size_bytes=int(b["info"]["size"]),
                repo_size_bytes=int(b["info"]["repository"]["size"]),
                wal_start=b["archive"]["start"] or "",
                wal_stop=b["archive"]["stop"] or "",
                lsn_start=(b.get("lsn") or {}).get("start") or "",
                lsn_stop=(b.get("lsn") or {}).get("stop") or "",
            )
            for b in entry.get("backup", [])
        )
        db_ids = [d["id"] for d in entry.get("db", [])]
        archives = [a for a in entry.get("archive", []) if not db_ids or a.get("database", {}).get("id") == max(db_ids)]
        current = archives[-1] if archives else {}
        status = entry.get("status", {})
        stanzas.append(StanzaInfo(
            name=entry["name"],
            status_code=int(status.get("code", -1)),
            status_message=status.get("message", ""),
            backups=tuple(sorted(backups, key=lambda b: b.started)),
            wal_min=current.get("min") or "",
            wal_max=current.get("max") or "",
        ))
    return stanzas
