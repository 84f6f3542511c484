"""`kubefly postgres member`: the supervisor of one Postgres member (postgres + repmgrd).

Postgres and repmgrd are children of this process (postgres dies with it:
PR_SET_PDEATHSIG), so a member lives and dies as one unit, like the pod it runs
in. repmgr starts and stops postgres through this process's local /ctl API.

Every `check_interval` the supervisor reads its own postgres and every peer's
/health, then, unless an operation is already running:
- postgres down: boot (initdb, clone, rejoin, or start) as decide.boot_action says;
- primary: fence itself (immediate stop) as decide.fence_reason says.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import hmac
import os
import pwd
import re
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import psycopg
from aiohttp import web
from prometheus_client import Counter, Gauge
from psycopg import sql

from kubefly import logs, metrics
from kubefly.postgres import archiver as arch
from kubefly.postgres import decide
from kubefly.postgres import pgbackrest as pb
from kubefly.postgres import repmgr as rm
from kubefly.postgres.repmgr import MemberSpec, Peer

log = logs.get("kubefly.postgres.member")

ROLE = Gauge("kubefly_postgres_role", "1 for the member's current role", ["role"])
WRITABLE = Gauge("kubefly_postgres_writable", "1 while this member accepts writes as the primary")
TIMELINE = Gauge("kubefly_postgres_timeline", "Current WAL timeline")
LAG = Gauge("kubefly_postgres_lag_bytes", "Bytes of WAL this standby is behind the primary")
VISIBLE = Gauge("kubefly_postgres_visible_peers", "Peers whose /health answered in the last check")
FENCES = Counter("kubefly_postgres_fences_total", "Times this member fenced itself", ["reason"])
BOOTS = Counter("kubefly_postgres_boot_actions_total", "Boot actions taken", ["action"])
STALLED_PROMOTIONS = Counter("kubefly_postgres_stalled_failover_promotions_total",
                             "Times this standby promoted itself after repmgrd promoted nobody")

_PR_SET_PDEATHSIG = 1
# How long a primary that was stopped keeps its address answering (refusing) after it said it is not
# writable: the operator polls every 2 s and drops the pod from the primary Service, which every
# kube-proxy then applies within a second or two.
DRAIN_S = 5.0
# A restore that failed is tried again after this long (each try downloads the backup again).
RESTORE_RETRY_S = 60.0
_LSN = re.compile(r"^([0-9A-Fa-f]+)/([0-9A-Fa-f]+)$")


def lsn_to_int(text: str | None) -> int | None:
    if not text:
        return None
    m = _LSN.match(text.strip())
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16) if m else None


@dataclass
class Local:
    """What our own postgres said at the last check."""

    up: bool = False
    in_recovery: bool = False
    timeline: int | None = None
    lsn: int | None = None  # current WAL position (primary) or last received (standby)
    replay_lsn: int | None = None
    upstream: str | None = None
    sync_standbys: int = 0  # primary: streaming standbys that may confirm a synchronous commit


@dataclass(frozen=True)
class Credentials:
    superuser_password: str
    repmgr_password: str

    def __repr__(self) -> str:  # never print passwords, even in a traceback's locals
        return "Credentials(<hidden>)"


class CommandFailed(RuntimeError):
    pass


class Member:
    def __init__(
        self,
        spec: MemberSpec,
        creds: Credentials,
        *,
        bootstrap: bool,
        fence_after_s: float = 3.0,
        check_interval_s: float = 0.5,
        admin_token: str,
        handover_timeout_s: float = 30.0,
        archive: arch.Settings | None = None,
        restore_from: pb.RestoreFrom | None = None,
    ) -> None:
        self.spec = spec
        self.creds = creds
        self.bootstrap = bootstrap
        self.fence_after_s = fence_after_s
        self.check_interval_s = check_interval_s
        if not admin_token:
            raise ValueError("a member needs its admin token: /switchover, /demote, /follow and /backup are refused without it")
        self.admin_token = admin_token
        self.handover_timeout_s = handover_timeout_s
        self.layout = spec.layout
        self.total = len(spec.peers) + 1
        self.local = Local()
        self.peer_views: dict[str, decide.View] = {p.name: decide.View() for p in spec.peers}
        self.visible: dict[str, decide.Report] = {}
        self.role = decide.STARTING
        self.fenced = False
        self.quorum_lost_since: float | None = None
        self.primary_held_until = 0.0
        self.op = asyncio.Lock()
        self.pg: asyncio.subprocess.Process | None = None
        self.repmgrd: asyncio.subprocess.Process | None = None
        self._conn: psycopg.AsyncConnection | None = None
        self._http: aiohttp.ClientSession | None = None
        self._uid, self._gid = self._postgres_ids()
        self._stopping = False
        self._repmgrd_started_at = 0.0
        self._astray_since: float | None = None
        # repmgrd gets this long after the last primary in sight before the member promotes in its stead:
        # well past repmgr's failover clock and past the old primary's fence deadline.
        self.promote_after_s = max(15.0, 3 * fence_after_s)
        self._primary_seen_at = time.monotonic()
        if restore_from is not None and archive is None:
            raise ValueError("a restore reads the object store: it needs the archive settings too")
        self.archiver = (arch.Archiver(archive, self.layout, spec.pg_port, self.layout.run, self.run_cmd, dict(os.environ),
                                       restore_from) if archive is not None else None)
        self._restore_failed_at = -RESTORE_RETRY_S
        self._archive_report: dict | None = None
        self._was_primary = False

    # ---- processes as the postgres user ----------------------------------

    @staticmethod
    def _postgres_ids() -> tuple[int | None, int | None]:
        if os.geteuid() != 0:
            return None, None  # already an unprivileged user (the image runs as postgres)
        pw = pwd.getpwnam("postgres")
        return pw.pw_uid, pw.pw_gid

    def _preexec(self) -> None:
        # Runs in the child between fork and exec: drop root, then die with the supervisor.
        if self._uid is not None:
            os.setgroups([])
            os.setgid(self._gid)
            os.setuid(self._uid)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def _env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.spec.bindir}:/usr/local/bin:/usr/bin:/bin",
            "PGPASSFILE": str(self.layout.pgpass),
            "HOME": str(self.layout.root),
            "LANG": "C.UTF-8",
            "PGCONNECT_TIMEOUT": "3",
            # repmgr's own metadata writes must not wait for a synchronous standby: at bootstrap
            # and right after a promotion there is none yet, and repmgr would hang on its own commit.
            "PGOPTIONS": "-c synchronous_commit=local",
            # postgres's archive_command and every pgbackrest command read the S3 keys from here.
            **(self.archiver.env if self.archiver is not None else {}),
        }

    def _chown(self, path: Path) -> None:
        if self._uid is not None:
            os.chown(path, self._uid, self._gid)

    async def run_cmd(self, argv: list[str], *, timeout: float = 120.0, check: bool = True, stdin: bytes | None = None) -> str:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self._env(),
            cwd=str(self.layout.root),
            preexec_fn=self._preexec,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise CommandFailed(f"{rm.describe(argv)} timed out after {timeout}s") from None
        text = out.decode(errors="replace")
        log.info("command", cmd=rm.describe(argv), rc=proc.returncode, seconds=round(time.monotonic() - started, 2),
                 output=text[-2000:])
        if check and proc.returncode != 0:
            raise CommandFailed(f"{rm.describe(argv)} exited {proc.returncode}")
        return text

    # ---- files ------------------------------------------------------------

    def prepare_dirs(self) -> None:
        for d in (self.layout.root, self.layout.run, self.layout.logs):
            d.mkdir(parents=True, exist_ok=True)
            self._chown(d)
        self.layout.run.chmod(0o700)
        self._write(self.layout.pgpass, rm.render_pgpass(self.creds.repmgr_password, self.creds.superuser_password))
        self._write(self.layout.repmgr_conf, rm.render_repmgr_conf(self.spec, f"http://127.0.0.1:{self.spec.health_port}"))
        if self.archiver is not None:
            self.archiver.prepare(self._write, self._chown)

    def _write(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self._chown(tmp)
        os.replace(tmp, path)

    def write_pg_config(self) -> None:
        """Our own postgresql.conf/pg_hba.conf, over whatever initdb or a clone left there."""
        spec = self.spec
        if self.archiver is not None:
            spec = dataclasses.replace(spec, extra_pg_settings={**spec.extra_pg_settings, **self.archiver.pg_settings()})
        self._write(self.layout.pgdata / "postgresql.conf", rm.render_postgresql_conf(spec))
        self._write(self.layout.pgdata / "pg_hba.conf", rm.render_pg_hba())

    def has_data(self) -> bool:
        return (self.layout.pgdata / "PG_VERSION").exists()

    def was_primary(self) -> bool:
        return self.has_data() and not (self.layout.pgdata / "standby.signal").exists()

    async def controldata(self) -> dict[str, str]:
        out = await self.run_cmd([str(self.spec.bindir / "pg_controldata"), str(self.layout.pgdata)], timeout=30)
        fields = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        return fields

    # ---- postgres lifecycle ----------------------------------------------

    def pg_running(self) -> bool:
        return self.pg is not None and self.pg.returncode is None

    async def start_postgres(self, timeout: float = 120.0) -> None:
        if self.pg_running():
            return
        if self.archiver is not None:
            # The archive is the lineage's: named after the data's system identifier.
            self.archiver.configure(self._write, (await self.controldata()).get("Database system identifier"))
        self.write_pg_config()
        logf = open(self.layout.logs / "postgres.log", "ab")
        try:
            self.pg = await asyncio.create_subprocess_exec(
                str(self.spec.bindir / "postgres"), "-D", str(self.layout.pgdata),
                stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                env=self._env(), cwd=str(self.layout.root), preexec_fn=self._preexec,
            )
        finally:
            logf.close()
        log.info("postgres started", pid=self.pg.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pg_running():
                raise CommandFailed(f"postgres exited with {self.pg.returncode} while starting (see postgres.log)")
            if await self.refresh_local():
                return
            await asyncio.sleep(0.2)
        raise CommandFailed("postgres did not accept connections in time")

    async def stop_postgres(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """fast: clean shutdown (standbys get the final WAL); immediate: stop now, crash-recover later."""
        await self._close_conn()
        proc = self.pg
        if proc is None or proc.returncode is not None:
            return
        signals = {"fast": [signal.SIGINT, signal.SIGQUIT], "immediate": [signal.SIGQUIT]}[mode]
        for sig in [*signals, signal.SIGKILL]:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), timeout if sig == signal.SIGINT else 10)
                break
            except TimeoutError:
                log.warning("postgres did not stop", signal=sig.name)
        log.info("postgres stopped", mode=mode, rc=proc.returncode)
        self.local = Local()

    async def ensure_clean_shutdown(self) -> None:
        """pg_rewind wants a cleanly shut down target: finish crash recovery in single-user mode first."""
        state = (await self.controldata()).get("Database cluster state", "")
        if state in ("in production", "in crash recovery"):
            await self.run_cmd(
                [str(self.spec.bindir / "postgres"), "--single", "-D", str(self.layout.pgdata), "postgres"],
                stdin=b"", timeout=300,
            )

    # ---- repmgrd ------------------------------------------------------------

    async def start_repmgrd(self) -> None:
        if self.repmgrd_running():
            return
        self._repmgrd_started_at = time.monotonic()
        logf = open(self.layout.logs / "repmgrd.stdout", "ab")
        try:
            self.repmgrd = await asyncio.create_subprocess_exec(
                *rm.repmgrd_argv(self.spec), stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                env=self._env(), cwd=str(self.layout.root), preexec_fn=self._preexec,
            )
        finally:
            logf.close()
        log.info("repmgrd started", pid=self.repmgrd.pid)

    def repmgrd_running(self) -> bool:
        return self.repmgrd is not None and self.repmgrd.returncode is None

    def repmgrd_settled(self) -> bool:
        """Running past its start-up checks (it exits within a second or two when its upstream is missing)."""
        return self.repmgrd_running() and time.monotonic() - self._repmgrd_started_at > 3

    async def stop_repmgrd(self) -> None:
        proc, self.repmgrd = self.repmgrd, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    # ---- observation ------------------------------------------------------

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def refresh_local(self) -> bool:
        if not self.pg_running():
            self.local = Local()
            return False
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    host=str(self.layout.run), port=self.spec.pg_port, user=rm.SUPERUSER, dbname="postgres",
                    connect_timeout=2, autocommit=True, application_name="kubefly-member",
                )
            cur = await asyncio.wait_for(self._conn.execute(_LOCAL_SQL), 2)
            row = await cur.fetchone()
        except (psycopg.Error, OSError, TimeoutError):
            await self._close_conn()
            self.local = Local()
            return False
        in_recovery, lsn, replay, tli, upstream, sync_standbys = row
        self.local = Local(True, in_recovery, tli, lsn_to_int(lsn), lsn_to_int(replay), upstream, sync_standbys)
        return True

    async def refresh_peers(self) -> None:
        async def one(peer: Peer) -> None:
            try:
                async with self._http.get(f"http://{_hostport(peer.host, peer.health_port)}/health") as resp:
                    body = await resp.json()
                self.peer_views[peer.name] = decide.View(decide.Report.from_json(body), time.monotonic())
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                pass

        await asyncio.gather(*(one(p) for p in self.spec.peers))
        horizon = time.monotonic() - max(1.5, 3 * self.check_interval_s)
        self.visible = {
            name: v.report for name, v in self.peer_views.items() if v.seen_at is not None and v.seen_at >= horizon
        }

    def primary_lsn(self) -> int | None:
        lsns = [r.lsn for r in self.visible.values() if r.role == decide.PRIMARY and r.lsn is not None]
        return max(lsns) if lsns else None

    def quorum(self) -> bool:
        return decide.has_quorum(len(self.visible), self.total)

    def health(self) -> dict:
        loc = self.local
        role = self.role
        if loc.up:
            role = decide.STANDBY if loc.in_recovery else decide.PRIMARY
        writable = (
            role == decide.PRIMARY
            and not self.fenced
            and not self._stopping
            and (self.total == 1 or self.quorum())
            and decide.newer_primary(self.spec.name, loc.timeline, self.visible) is None
        )
        # A synchronous commit returns only once a standby confirms it: a primary with none streaming
        # accepts the commit and then holds the client forever. It stays writable (standbys follow it,
        # nobody else may be primary), but nobody routes clients to it until a standby is back.
        can_commit = writable and (not self.spec.synchronous or loc.sync_standbys > 0)
        lag = None
        if role == decide.STANDBY and loc.replay_lsn is not None:
            primary = self.primary_lsn()
            lag = max(0, primary - loc.replay_lsn) if primary is not None else None
        return {
            "name": self.spec.name,
            "node_id": self.spec.node_id,
            "region": self.spec.region,
            "role": role,
            "writable": writable,
            "can_commit": can_commit,
            "sync_standbys": loc.sync_standbys if role == decide.PRIMARY else None,
            "timeline": loc.timeline,
            "lsn": _lsn_text(loc.lsn),
            "lsn_bytes": loc.lsn,
            "replay_lsn": _lsn_text(loc.replay_lsn),
            "lag_bytes": lag,
            "upstream": loc.upstream,
            "visible_peers": sorted(self.visible),
            "quorum": self.quorum(),
            "fenced": self.fenced,
            "repmgrd": self.repmgrd_settled(),
            "busy": self.op.locked(),
            "restore": self.archiver.restore_report if self.archiver is not None else None,
            "archive": self._archive_report if role == decide.PRIMARY or self._archive_report is None
            else {k: self._archive_report[k] for k in ("path", "stanza", "error", "backup")},
        }

    def _export_metrics(self, h: dict) -> None:
        for r in (decide.PRIMARY, decide.STANDBY, decide.FENCED, decide.STARTING, decide.EMPTY):
            ROLE.labels(r).set(1 if h["role"] == r else 0)
        WRITABLE.set(1 if h["writable"] else 0)
        TIMELINE.set(h["timeline"] or 0)
        LAG.set(h["lag_bytes"] or 0)
        VISIBLE.set(len(h["visible_peers"]))

    # ---- the supervision loop ------------------------------------------------

    async def loop(self) -> None:
        while not self._stopping:
            await self.refresh_peers()
            await self.refresh_local()
            now = time.monotonic()
            if self.quorum():
                self.quorum_lost_since = None
            elif self.quorum_lost_since is None:
                self.quorum_lost_since = now
            h = self.health()
            if h["role"] == decide.PRIMARY or any(r.role == decide.PRIMARY for r in self.visible.values()):
                self._primary_seen_at = now
            await self._tend_archive(h)
            self._export_metrics(h)
            if not self.op.locked():
                try:
                    await self._step(now)
                except (CommandFailed, OSError, psycopg.Error) as exc:
                    log.error("step failed", error=str(exc))
                    await asyncio.sleep(1)
            await asyncio.sleep(self.check_interval_s)

    async def _tend_archive(self, h: dict) -> None:
        if self.archiver is None:
            return
        primary = h["role"] == decide.PRIMARY and h["writable"]
        if primary and not self._was_primary:
            self.archiver.promoted()
        self._was_primary = primary
        self.archiver.tend(primary=primary)
        if self.local.up and self._conn is not None:
            try:
                self._archive_report = await asyncio.wait_for(
                    self.archiver.observe(self._conn, primary=primary, now=datetime.now(UTC)), 2)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("archive status unread", error=str(exc))

    async def _step(self, now: float) -> None:
        if self.pg_running() and self.local.up and not self.local.in_recovery:
            reason = decide.fence_reason(
                me=self.spec.name, my_timeline=self.local.timeline, peers=self.visible, total_members=self.total,
                quorum_lost_since=self.quorum_lost_since, now=now, fence_after_s=self.fence_after_s,
            )
            if reason:
                async with self.op:
                    await self.fence(reason)
            return
        if self.pg_running() and self.local.up:
            reason = decide.stalled_failover(
                me=self.spec.name, my_lsn=self.local.lsn, my_node_id=self.spec.node_id, peers=self.visible,
                total_members=self.total, primary_seen_at=self._primary_seen_at, now=now,
                promote_after_s=self.promote_after_s,
            )
            if reason:
                async with self.op:
                    await self.promote_stalled(reason)
                return
            await self._check_upstream(now)
        if self.pg_running():
            # repmgrd exits when its upstream is unreachable at start-up: retry, but not in a tight loop.
            if self.local.up and not self.repmgrd_running() and now - self._repmgrd_started_at > 5:
                await self.start_repmgrd()
            return
        action = decide.boot_action(
            me=self.spec.name, has_data=self.has_data(), was_primary=self.was_primary(),
            my_timeline=await self._stored_timeline(), bootstrap=self.bootstrap, peers=self.visible,
            total_members=self.total, primary_held=now < self.primary_held_until,
        )
        if action.kind == "wait" or (action.kind == "initdb" and now - self._restore_failed_at < RESTORE_RETRY_S):
            # (A restore that just failed waits before the next try: each downloads the backup again.)
            self.role = decide.FENCED if self.fenced else (decide.EMPTY if not self.has_data() else decide.STARTING)
            return
        async with self.op:
            BOOTS.labels(action.kind).inc()
            log.info("boot action", action=action.kind, source=action.source, why=action.why)
            self.role = decide.STARTING
            await self._do(action)

    async def _check_upstream(self, now: float) -> None:
        """A standby not streaming from the visible primary for a while follows it.

        repmgrd normally does this, but a standby whose repmgrd could not start
        (its upstream was already gone) or that missed the failover has nobody else to do it.
        """
        primaries = [n for n, r in self.visible.items() if r.role == decide.PRIMARY and r.writable]
        if not self.local.in_recovery or len(primaries) != 1:
            self._astray_since = None
            return
        primary = self._peer(primaries[0])
        if self.local.upstream == f"{primary.host}:{primary.pg_port}":
            self._astray_since = None
            return
        if self._astray_since is None:
            self._astray_since = now
        elif now - self._astray_since > 8:
            self._astray_since = None
            async with self.op:
                log.warning("standby not following the primary; following it", primary=primary.name,
                            upstream=self.local.upstream)
                await self.run_cmd(rm.follow_argv(self.spec, self.visible[primary.name].node_id), timeout=60)

    async def promote_stalled(self, reason: str) -> None:
        STALLED_PROMOTIONS.inc()
        log.warning("promoting: failover stalled", reason=reason)
        await self.stop_repmgrd()  # started again below, so it monitors this node as the primary
        try:
            await self.run_cmd(rm.promote_argv(self.spec), timeout=60)
        finally:
            self._primary_seen_at = time.monotonic()
            await self.refresh_local()
            await self.start_repmgrd()

    async def _stored_timeline(self) -> int | None:
        if not self.has_data():
            return None
        tli = (await self.controldata()).get("Latest checkpoint's TimeLineID")
        return int(tli) if tli and tli.isdigit() else None

    def _peer(self, name: str) -> Peer:
        return next(p for p in self.spec.peers if p.name == name)

    async def _do(self, action: decide.Action) -> None:
        if action.kind == "initdb":
            await self.initdb()
        elif action.kind == "clone":
            await self.clone(self._peer(action.source))
        elif action.kind == "rejoin":
            await self.rejoin(self._peer(action.source))
        elif action.kind in ("start-primary", "start-standby"):
            await self.start_postgres()
        self.fenced = False
        await self.start_repmgrd()

    # ---- the actions ----------------------------------------------------------

    async def initdb(self) -> None:
        if self.archiver is not None and self.archiver.restore_from is not None:
            await self.restore_from_archive()
            return
        pgdata = self.layout.pgdata
        if pgdata.exists():
            shutil.rmtree(pgdata)
        pwfile = self.layout.run / "initdb.pw"
        self._write(pwfile, self.creds.superuser_password + "\n")
        try:
            await self.run_cmd([
                str(self.spec.bindir / "initdb"), "-D", str(pgdata), "-U", rm.SUPERUSER, f"--pwfile={pwfile}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
            ])
        finally:
            pwfile.unlink(missing_ok=True)
        await self.start_postgres()
        async with await psycopg.AsyncConnection.connect(
            host=str(self.layout.run), port=self.spec.pg_port, user=rm.SUPERUSER, dbname="postgres", autocommit=True,
            options="-c synchronous_commit=local",  # no standby exists yet to confirm these commits
        ) as conn:
            await conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN SUPERUSER REPLICATION PASSWORD {}").format(
                    sql.Identifier(rm.REPMGR_USER), sql.Literal(self.creds.repmgr_password)
                )
            )
            await conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(rm.REPMGR_DB), sql.Identifier(rm.REPMGR_USER)))
        await self.run_cmd(rm.register_primary_argv(self.spec))

    async def restore_from_archive(self) -> None:
        """The new cluster's first data: another cluster's backup and WAL up to the target, promoted,
        then made this cluster's own (its passwords, its repmgr node, no recovery settings left)."""
        src = self.archiver.restore_from
        report = self.archiver.restore_report = {"state": "restoring", "from": src.describe, "error": None}
        try:
            pgdata = self.layout.pgdata
            if pgdata.exists():
                shutil.rmtree(pgdata)
            pgdata.mkdir(mode=0o700)
            self._chown(pgdata)
            await self.archiver.restore_files(self._write)
            report["state"] = "recovering"
            await self.start_postgres(timeout=arch.BACKUP_TIMEOUT_S)
            while not (self.local.up and not self.local.in_recovery):
                if not self.pg_running():
                    raise CommandFailed("postgres stopped during recovery (a target past the archive's end?): "
                                        "see its postgres.log")
                report["replay_lsn"] = _lsn_text(self.local.replay_lsn)
                await asyncio.sleep(1)
                await self.refresh_local()
            async with await psycopg.AsyncConnection.connect(
                host=str(self.layout.run), port=self.spec.pg_port, user=rm.SUPERUSER, dbname="postgres",
                autocommit=True, options="-c synchronous_commit=local",
            ) as conn:
                for role, password in ((rm.SUPERUSER, self.creds.superuser_password),
                                       (rm.REPMGR_USER, self.creds.repmgr_password)):
                    await conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role),
                                                                                  sql.Literal(password)))
                # pgBackRest's restore_command and recovery target: a standby cloned from here must not stop there.
                await conn.execute("ALTER SYSTEM RESET ALL")
                await conn.execute("SELECT pg_reload_conf()")
            async with await psycopg.AsyncConnection.connect(
                host=str(self.layout.run), port=self.spec.pg_port, user=rm.SUPERUSER, dbname=rm.REPMGR_DB,
                autocommit=True, options="-c synchronous_commit=local",
            ) as conn:
                # The source's members are not ours: each of ours registers itself when it clones.
                await conn.execute("UPDATE repmgr.nodes SET upstream_node_id = NULL")  # (a foreign key)
                await conn.execute("DELETE FROM repmgr.nodes WHERE node_id <> %s", (self.spec.node_id,))
            await self.run_cmd(rm.register_primary_argv(self.spec))
            report.update(state="done", replay_lsn=_lsn_text(self.local.lsn))
            log.info("restored", source=src.describe)
        except (CommandFailed, OSError, psycopg.Error) as exc:
            self._restore_failed_at = time.monotonic()
            report.update(state="failed", error=f"{type(exc).__name__}: {exc}"[:1000])
            await self.stop_postgres("immediate")
            shutil.rmtree(self.layout.pgdata, ignore_errors=True)  # an empty member again: the next try starts clean
            raise

    async def clone(self, source: Peer) -> None:
        await self.stop_postgres("immediate")
        pgdata = self.layout.pgdata
        if pgdata.exists():
            shutil.rmtree(pgdata)
        pgdata.mkdir(mode=0o700)
        self._chown(pgdata)
        await self.run_cmd(rm.clone_argv(self.spec, source), timeout=600)
        await self.start_postgres()
        await self.run_cmd(rm.register_standby_argv(self.spec), timeout=60)

    async def rejoin(self, primary: Peer) -> None:
        """Come back as a standby of `primary`: pg_rewind through repmgr, a fresh clone if that fails."""
        await self.stop_repmgrd()
        await self.stop_postgres("immediate")
        try:
            await self.ensure_clean_shutdown()
            await self.checkpoint_source(primary)
            await self.run_cmd(rm.rejoin_argv(self.spec, primary), timeout=180)
            if not self.pg_running():
                await self.start_postgres()
        except CommandFailed as exc:
            log.warning("rejoin failed, cloning afresh", error=str(exc), primary=primary.name)
            await self.clone(primary)

    async def checkpoint_source(self, primary: Peer) -> None:
        """CHECKPOINT on the rewind source, so its control file names its current timeline.

        A freshly promoted primary records its new timeline in pg_control only at
        the end of its first checkpoint, which is spread over seconds. Before that,
        pg_rewind reads the same timeline on both sides, says "no rewind required",
        and the diverged old primary can never stream (rejoin times out, re-clone).
        """
        try:
            async with await psycopg.AsyncConnection.connect(
                host=primary.host, port=primary.pg_port, user=rm.REPMGR_USER, dbname=rm.REPMGR_DB,
                password=self.creds.repmgr_password, connect_timeout=3, autocommit=True,
            ) as conn:
                await asyncio.wait_for(conn.execute("CHECKPOINT"), 60)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            # pg_rewind may still work (an older promotion); the rejoin falls back to a clone if not.
            log.warning("checkpoint on the rewind source failed", primary=primary.name, error=str(exc))

    async def fence(self, reason: str) -> None:
        """Stop accepting writes now: health says not writable at once, then postgres stops immediately.

        An immediate stop (not fast): a fast shutdown waits for walsenders to
        deliver the last WAL, which may never happen across a partition.
        """
        self.fenced = True
        self.role = decide.FENCED
        FENCES.labels("newer-primary" if "timeline" in reason else "no-majority").inc()
        log.warning("fencing", reason=reason)
        await self.stop_repmgrd()
        await self.stop_postgres("immediate")

    # ---- planned switchover -------------------------------------------------

    async def demote(self) -> dict:
        """The primary's half of a switchover: stop cleanly, hand back the last WAL position."""
        async with self.op:
            self.fenced = True
            self.role = decide.FENCED
            self.primary_held_until = time.monotonic() + 120
            await self.stop_repmgrd()
            await self.stop_postgres("fast")
            ckpt = (await self.controldata()).get("Latest checkpoint location")
            log.info("demoted for switchover", checkpoint=ckpt)
            return {"checkpoint_lsn": ckpt}

    async def follow(self, node_id: int) -> None:
        async with self.op:
            await self.run_cmd(rm.follow_argv(self.spec, node_id), timeout=60)

    async def switchover(self) -> dict:
        """Make this standby the primary: pause repmgrd everywhere, demote the primary, catch up, promote."""
        async with self.op:
            if not (self.local.up and self.local.in_recovery):
                raise web.HTTPConflict(text="switchover target must be a running standby")
            primaries = [n for n, r in self.visible.items() if r.role == decide.PRIMARY]
            if len(primaries) != 1:
                raise web.HTTPConflict(text=f"need exactly one visible primary, see {primaries}")
            old = self._peer(primaries[0])
            others = [p for p in self.spec.peers if p.name != old.name]
            await self.run_cmd(rm.service_argv(self.spec, "pause"), check=False)
            try:
                body = await self._admin_post(old, "/demote", timeout=90)
                target = lsn_to_int(body.get("checkpoint_lsn"))
                deadline = time.monotonic() + 30
                while True:
                    await self.refresh_local()
                    if target is not None and (self.local.replay_lsn or 0) > target:
                        break
                    if time.monotonic() > deadline:
                        raise CommandFailed("standby did not receive the old primary's final WAL")
                    await asyncio.sleep(0.1)
                await self.run_cmd(rm.promote_argv(self.spec), timeout=60)
                await self.refresh_local()
                for peer in others:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        await self._admin_post(peer, "/follow", json={"node_id": self.spec.node_id}, timeout=90)
            finally:
                await self.run_cmd(rm.service_argv(self.spec, "unpause"), check=False)
            log.info("switchover done", old_primary=old.name)
            return {"primary": self.spec.name, "old_primary": old.name}

    async def _admin_post(self, peer: Peer, path: str, *, json: dict | None = None, timeout: float) -> dict:
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        async with self._http.post(
            f"http://{_hostport(peer.host, peer.health_port)}{path}", json=json or {}, headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            if resp.status != 200:
                raise CommandFailed(f"{peer.name}{path}: HTTP {resp.status} {await resp.text()}")
            return await resp.json()

    # ---- HTTP ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._h_health)
        app.router.add_get("/metrics", self._h_metrics)
        app.router.add_post("/ctl/{action}", self._h_ctl)
        app.router.add_post("/switchover", self._h_switchover)
        app.router.add_post("/demote", self._h_demote)
        app.router.add_post("/follow", self._h_follow)
        app.router.add_post("/backup", self._h_backup)
        return app

    async def _h_health(self, _req: web.Request) -> web.Response:
        return web.json_response(self.health())

    async def _h_metrics(self, _req: web.Request) -> web.Response:
        body, ctype = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def _h_ctl(self, req: web.Request) -> web.Response:
        # repmgr's service_*_command: from this machine only.
        if req.remote not in ("127.0.0.1", "::1"):
            raise web.HTTPForbidden()
        action = req.match_info["action"]
        log.info("ctl", action=action)
        if action in ("stop", "restart"):
            await self.stop_postgres("fast")
        if action in ("start", "restart"):
            await self.start_postgres()
        elif action != "stop":
            raise web.HTTPNotFound()
        return web.json_response({"ok": True})

    def _authorize(self, req: web.Request) -> None:
        given = req.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {self.admin_token}".encode()):
            raise web.HTTPUnauthorized()

    async def _h_switchover(self, req: web.Request) -> web.Response:
        self._authorize(req)
        try:
            return web.json_response(await self.switchover())
        except CommandFailed as exc:
            raise web.HTTPInternalServerError(text=str(exc)) from exc

    async def _h_demote(self, req: web.Request) -> web.Response:
        self._authorize(req)
        if not (self.local.up and not self.local.in_recovery):
            raise web.HTTPConflict(text="not a running primary")
        return web.json_response(await self.demote())

    async def _h_follow(self, req: web.Request) -> web.Response:
        self._authorize(req)
        node_id = int((await req.json())["node_id"])
        try:
            await self.follow(node_id)
        except CommandFailed as exc:
            raise web.HTTPInternalServerError(text=str(exc)) from exc
        return web.json_response({"ok": True})

    async def _h_backup(self, req: web.Request) -> web.Response:
        """Start a base backup here ({"id": the PostgresBackup's uid, "type": full|incr|diff,
        "retention_days": the recovery window}); its progress and outcome are on /health under
        archive.backup."""
        self._authorize(req)
        if self.archiver is None:
            raise web.HTTPConflict(text="this member does not archive (the platform has no object store)")
        if not (self.local.up and not self.local.in_recovery and self.health()["writable"]):
            raise web.HTTPConflict(text="not the writable primary")
        body = await req.json()
        kind, days = body.get("type", "full"), body.get("retention_days", arch.DEFAULT_RECOVERY_WINDOW_DAYS)
        if (kind not in ("full", "incr", "diff") or not isinstance(body.get("id"), str) or not body["id"]
                or not isinstance(days, int) or not 1 <= days <= 3650):
            raise web.HTTPBadRequest(
                text='expected {"id": "...", "type": "full" | "incr" | "diff", "retention_days": 1..3650}')
        try:
            run = self.archiver.start_backup(body["id"], kind, days)
        except arch.BackupBusy as exc:
            raise web.HTTPConflict(text=str(exc)) from exc
        return web.json_response(run.report(), status=202)

    # ---- main -----------------------------------------------------------------

    async def serve(self) -> None:
        self.prepare_dirs()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", self.spec.health_port).start()
        log.info("member up", name=self.spec.name, node_id=self.spec.node_id, peers=[p.name for p in self.spec.peers])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(self.loop())
        await stop.wait()
        await self.stop_gracefully(task)
        await self._http.close()
        await runner.cleanup()
        log.info("member stopped")

    async def stop_gracefully(self, supervision: asyncio.Task) -> None:
        """SIGTERM (the pod is deleted, evicted or drained; the kubelet SIGKILLs after the grace period).

        A primary stops being writable at once (the operator and the endpoint
        stop sending it clients), hands over to its most advanced standby when
        one is streaming (a planned switchover: no failover race with its own
        next pod), stops postgres, and keeps answering for DRAIN_S: its address
        must keep refusing until the primary Service has dropped it, since a
        connection to an address that is gone hangs instead of failing.
        """
        was_primary = self.local.up and not self.local.in_recovery and self.health()["writable"]
        self._stopping = True  # health says not writable from now on
        stopped_at = time.monotonic()
        supervision.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervision
        if was_primary:
            log.info("stopping as primary", handover_timeout=self.handover_timeout_s)
            try:
                await asyncio.wait_for(self.hand_over(), self.handover_timeout_s)
            except (CommandFailed, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("no switchover before stopping; the standbys fail over", error=str(exc))
        await self.stop_repmgrd()
        await self.stop_postgres("fast")
        if was_primary:
            await asyncio.sleep(max(0.0, DRAIN_S - (time.monotonic() - stopped_at)))

    async def hand_over(self) -> None:
        """Ask the most advanced streaming standby to take over (its /switchover demotes us through /demote)."""
        await self.refresh_peers()
        if not await self.refresh_local():
            await self.refresh_local()  # the cancelled supervision loop may have left the connection mid-query
        standbys = sorted(
            (r for r in self.visible.values() if r.role == decide.STANDBY and r.lsn is not None),
            key=lambda r: r.lsn, reverse=True,
        )
        if not standbys or (self.spec.synchronous and self.local.sync_standbys == 0):
            raise CommandFailed(f"no standby streaming to take over (visible: {sorted(self.visible)})")
        target = self._peer(standbys[0].name)
        started = time.monotonic()
        body = await self._admin_post(target, "/switchover", timeout=self.handover_timeout_s)
        log.info("handed over before stopping", primary=body.get("primary"),
                 seconds=round(time.monotonic() - started, 2))


_LOCAL_SQL = """
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()::text ELSE pg_current_wal_lsn()::text END,
       pg_last_wal_replay_lsn()::text,
       CASE WHEN pg_is_in_recovery()
            THEN COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), (pg_control_checkpoint()).timeline_id)
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
       (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver),
       (SELECT count(*)::int FROM pg_stat_replication WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum'))
"""


def _lsn_text(value: int | None) -> str | None:
    return None if value is None else f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
