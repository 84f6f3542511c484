"""Rendering of postgresql.conf, pg_hba.conf, .pgpass and repmgr.conf, and repmgr argv builders.

Everything here is pure (strings and lists in, strings and lists out) so it is
unit-tested without a server; member.py writes the files and runs the commands.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

PG_BINDIR = Path("/usr/lib/postgresql/15/bin")
REPMGR_USER = "repmgr"
REPMGR_DB = "repmgr"
SUPERUSER = "postgres"


@dataclass(frozen=True)
class Peer:
    """Another member, as this member reaches it (replication and health)."""

    name: str
    host: str
    pg_port: int
    health_port: int

    @classmethod
    def parse(cls, spec: str) -> "Peer":
        """`name=host:pgport:healthport` (the host may be an IPv6 literal in brackets)."""
        name, sep, rest = spec.partition("=")
        host, pg_port, health_port = rest.rsplit(":", 2) if sep else ("", "", "")
        if not name or not host:
            raise ValueError(f"peer {spec!r}: expected name=host:pgport:healthport")
        return cls(name, host.strip("[]"), int(pg_port), int(health_port))


@dataclass(frozen=True)
class Layout:
    """Where a member keeps its files: everything under one volume."""

    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def repmgr_conf(self) -> Path:
        return self.root / "repmgr.conf"

    @property
    def pgpass(self) -> Path:
        return self.root / "pgpass"


@dataclass(frozen=True)
class MemberSpec:
    name: str
    node_id: int
    region: str
    host: str  # the address peers use for this member
    pg_port: int
    health_port: int
    layout: Layout
    peers: tuple[Peer, ...] = ()
    synchronous: bool = False
    priority: int = 100
    bindir: Path = PG_BINDIR
    # repmgr's failover clock: a primary is given up after about
    # monitor_interval + reconnect_attempts * reconnect_interval seconds.
    # With primary_visibility_consensus a sibling that saw the primary less than
    # 2 x monitor_interval ago cancels the election, and repmgr never reruns a
    # cancelled one. The first standby to notice a dead primary must therefore
    # retry for longer than that window ((attempts - 1) x interval >= 2 x monitor),
    # else it cancels on a sibling that has not noticed yet and nobody promotes.
    monitor_interval_s: int = 1
    reconnect_attempts: int = 3
    reconnect_interval_s: int = 1
    extra_pg_settings: dict[str, str] = field(default_factory=dict)

    @property
    def member_names(self) -> list[str]:
        return sorted([self.name, *(p.name for p in self.peers)])


def conninfo(host: str, port: int, *, user: str = REPMGR_USER, dbname: str = REPMGR_DB, connect_timeout: int = 2) -> str:
    # No password here: libpq reads it from the pgpass file, so it never lands in repmgr's tables or logs.
    # No application_name either: repmgr names each standby's walreceiver after its node, which
    # synchronous_standby_names relies on.
    return f"host={host} port={port} user={user} dbname={dbname} connect_timeout={connect_timeout}"


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def synchronous_standby_names(names: list[str]) -> str:
    """Any one standby confirms: every member is listed, the primary's own name simply never matches."""
    return "ANY 1 (" + ", ".join(f'"{n}"' for n in names) + ")"


def render_postgresql_conf(spec: MemberSpec) -> str:
    settings: dict[str, str] = {
        "listen_addresses": "'*'",
        "port": str(spec.pg_port),
        "unix_socket_directories": _quote(str(spec.layout.run)),
        "unix_socket_permissions": "0700",
        "hba_file": _quote(str(spec.layout.pgdata / "pg_hba.conf")),
        "max_connections": "100",
        "shared_buffers": "32MB",
        "shared_preload_libraries": "'repmgr'",
        "wal_level": "replica",
        # pg_rewind needs hint bits WAL-logged to rewind an old primary instead of re-cloning it.
        "wal_log_hints": "on",
        "hot_standby": "on",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "wal_keep_size": "'256MB'",
        # A dead standby connection is noticed in seconds, not the default minute.
        "wal_sender_timeout": "'5s'",
        "wal_receiver_timeout": "'5s'",
        "wal_retrieve_retry_interval": "'1s'",
        "tcp_keepalives_idle": "2",
        "tcp_keepalives_interval": "1",
        "tcp_keepalives_count": "2",
        "password_encryption": "'scram-sha-256'",
        "logging_collector": "off",
        "log_line_prefix": _quote(f"%m [%p] {spec.name} "),
        "archive_mode": "off",
    }
    if spec.synchronous:
        settings["synchronous_standby_names"] = _quote(synchronous_standby_names(spec.member_names))
        settings["synchronous_commit"] = "on"
    else:
        settings["synchronous_standby_names"] = "''"
        settings["synchronous_commit"] = "local"
    settings.update(spec.extra_pg_settings)
    lines = ["# Written by kubefly postgres member at every start; edits are overwritten."]
    lines += [f"{k} = {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def render_pg_hba() -> str:
    return "\n".join(
        [
            "# Written by kubefly postgres member.",
            # The socket directory is private to the postgres user (mode 0700), so local trust is local only.
            "local all all trust",
            f"host replication {REPMGR_USER} all scram-sha-256",
            "host all all all scram-sha-256",
        ]
    ) + "\n"


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def render_pgpass(repmgr_password: str, superuser_password: str) -> str:
    return (
        f"*:*:*:{REPMGR_USER}:{_pgpass_field(repmgr_password)}\n"
        f"*:*:*:{SUPERUSER}:{_pgpass_field(superuser_password)}\n"
    )


def render_repmgr_conf(spec: MemberSpec, ctl_url: str) -> str:
    """repmgr.conf for repmgr and repmgrd; `ctl_url` is the supervisor's local control endpoint.

    Postgres is a child of the supervisor (so the member lives and dies as one
    unit), hence repmgr starts/stops/restarts it through the supervisor rather
    than with pg_ctl.
    """
    repmgr = spec.bindir / "repmgr"
    conf = str(spec.layout.repmgr_conf)

    def ctl(action: str) -> str:
        return f"curl -fsS -X POST --max-time 120 {ctl_url}/ctl/{action}"

    settings: list[tuple[str, str | int | bool]] = [
        ("node_id", spec.node_id),
        ("node_name", spec.name),
        ("conninfo", conninfo(spec.host, spec.pg_port)),
        ("data_directory", str(spec.layout.pgdata)),
        ("pg_bindir", str(spec.bindir)),
        ("location", spec.region),
        ("priority", spec.priority),
        ("use_replication_slots", False),
        ("failover", "automatic"),
        ("promote_command", f"{repmgr} standby promote -f {conf} --log-to-file"),
        ("follow_command", f"{repmgr} standby follow -f {conf} --log-to-file --upstream-node-id=%n"),
        ("monitor_interval_secs", spec.monitor_interval_s),
        ("reconnect_attempts", spec.reconnect_attempts),
        ("reconnect_interval", spec.reconnect_interval_s),
        ("connection_check_type", "ping"),
        # A standby that any sibling says still sees the primary does not promote: a
        # standby cut off alone never takes over, and repmgr also requires a majority.
        ("primary_visibility_consensus", True),
        ("primary_notification_timeout", 15),
        ("standby_follow_timeout", 15),
        ("standby_follow_restart", False),
        # A rejoin that has not attached by then falls back to a fresh clone (member.rejoin).
        ("node_rejoin_timeout", 20),
        ("promote_check_timeout", 30),
        ("promote_check_interval", 1),
        ("degraded_monitoring_timeout", -1),
        ("service_start_command", ctl("start")),
        ("service_stop_command", ctl("stop")),
        ("service_restart_command", ctl("restart")),
        ("log_level", "INFO"),
        ("log_file", str(spec.layout.logs / "repmgr.log")),
        ("log_status_interval", 60),
    ]
    out = ["# Written by kubefly postgres member at every start."]
    for key, value in settings:
        if isinstance(value, bool):
            out.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int):
            out.append(f"{key}={value}")
        else:
            out.append(f"{key}={_quote(value)}")
    return "\n".join(out) + "\n"


# ---- argv builders (run as the postgres user, PGPASSFILE set) ---------------


def _repmgr(spec: MemberSpec, *args: str) -> list[str]:
    return [str(spec.bindir / "repmgr"), "-f", str(spec.layout.repmgr_conf), *args]


def clone_argv(spec: MemberSpec, source: Peer) -> list[str]:
    return _repmgr(
        spec, "-h", source.host, "-p", str(source.pg_port), "-U", REPMGR_USER, "-d", REPMGR_DB,
        "standby", "clone", "--fast-checkpoint", "--force",
    )


def register_primary_argv(spec: MemberSpec) -> list[str]:
    return _repmgr(spec, "primary", "register", "--force")


def register_standby_argv(spec: MemberSpec) -> list[str]:
    return _repmgr(spec, "standby", "register", "--force", "--wait-sync=30")


def rejoin_argv(spec: MemberSpec, primary: Peer) -> list[str]:
    # --config-files keeps this member's own port/paths: pg_rewind copies the source's config otherwise.
    return _repmgr(
        spec, "node", "rejoin", "-d", conninfo(primary.host, primary.pg_port),
        "--force-rewind", "--config-files=postgresql.conf,pg_hba.conf", "--log-to-file",
    )


def promote_argv(spec: MemberSpec) -> list[str]:
    return _repmgr(spec, "standby", "promote", "--log-to-file")


def follow_argv(spec: MemberSpec, upstream_node_id: int) -> list[str]:
    return _repmgr(spec, "standby", "follow", f"--upstream-node-id={upstream_node_id}", "--log-to-file")


def repmgrd_argv(spec: MemberSpec) -> list[str]:
    return [str(spec.bindir / "repmgrd"), "-f", str(spec.layout.repmgr_conf), "--daemonize=false",
            # The supervisor tracks repmgrd itself; a shared default PID file would clash between members.
            "--no-pid-file"]


def service_argv(spec: MemberSpec, action: str) -> list[str]:
    """`repmgr service pause|unpause`: stop every repmgrd from acting during a planned switchover."""
    return _repmgr(spec, "service", action)


def describe(argv: list[str]) -> str:
    """A loggable form of an argv (argvs never carry passwords: those live in the pgpass file)."""
    return shlex.join(argv)
