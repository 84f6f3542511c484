"""WAL archiving, a base backup and point-in-time restore with pgBackRest against a real
Postgres 15 and the real S3 server (the shared `object_store` fixture, over its TLS port:
pgBackRest 2.45 speaks S3 only over HTTPS)."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from kubefly.ports import free_port
from kubefly.postgres import pgbackrest as pb
from kubefly.postgres.repmgr import PG_BINDIR, Layout
from pg_component_helpers import wait_for

pytestmark = pytest.mark.component

PGBACKREST_BIN = shutil.which("pgbackrest")
SEGMENT = re.compile(r"^[0-9A-F]{24}$")


def _ids() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


IDS = _ids()


def _drop() -> None:
    if IDS is not None:
        os.setgroups([])
        os.setgid(IDS[1])
        os.setuid(IDS[0])


def _own(path: Path) -> None:
    if IDS is not None:
        os.chown(path, *IDS)


class Node:
    """One Postgres with its pgBackRest files, run as the postgres user."""

    def __init__(self, root: Path, repo: pb.Repository, cluster: str) -> None:
        self.layout = Layout(root)
        self.port = free_port()
        self.member = pb.Member(cluster=cluster, layout=self.layout, pg_port=self.port, socket_dir=self.layout.run)
        self.env = {"PATH": f"{PG_BINDIR}:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(root),
                    **pb.environment(repo)}
        for d in (root, self.layout.run, *self.member.directories()):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            _own(d)
        self.member.config.write_text(pb.render_conf(repo, self.member))
        self.member.config.chmod(0o600)
        _own(self.member.config)
        self.started = False

    def run(self, argv: list[str], timeout: float = 120) -> str:
        done = subprocess.run(argv, env=self.env, cwd=self.layout.root, preexec_fn=_drop, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{argv[:4]}... exited {done.returncode}:\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def start(self, *options: str) -> None:
        opts = " ".join([f"-p {self.port}", f"-c unix_socket_directories={self.layout.run}", *options])
        self.started = True
        self.run([str(PG_BINDIR / "pg_ctl"), "-D", str(self.layout.pgdata),
                  "-l", str(self.layout.root / "postgres.log"), "-o", opts, "-w", "-t", "60", "start"], timeout=90)

    def stop(self) -> None:
        if self.started:
            subprocess.run([str(PG_BINDIR / "pg_ctl"), "-D", str(self.layout.pgdata), "-m", "immediate",
                            "-w", "-t", "30", "stop"], env=self.env, preexec_fn=_drop, capture_output=True, timeout=60)
            self.started = False

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(host=str(self.layout.run), port=self.port, user="postgres", dbname="postgres",
                               autocommit=True, connect_timeout=5)

    def info(self) -> pb.StanzaInfo:
        (stanza,) = pb.parse_info(self.run(pb.info(self.member), timeout=60))
        return stanza

    def log_tail(self) -> str:
        logs = [self.layout.root / "postgres.log", *sorted(self.member.log_dir.glob("*.log"))]
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in logs if p.exists())


def archiving_node(root: Path, repo: pb.Repository, cluster: str, nodes: list[Node]) -> Node:
    """A fresh cluster (initdb'd, not started) that archives its WAL with pgBackRest."""
    node = Node(root, repo, cluster)
    nodes.append(node)
    node.run([str(PG_BINDIR / "initdb"), "-D", str(node.layout.pgdata), "-U", "postgres", "-A", "trust",
              "--no-sync", "-E", "UTF8"], timeout=120)
    with (node.layout.pgdata / "postgresql.conf").open("a") as conf:
        command = pb.archive_command(node.member).replace("'", "''")
        conf.write(f"\nlisten_addresses = ''\nwal_level = replica\narchive_mode = on\n"
                   f"archive_command = '{command}'\nfsync = off\n")
    return node


@pytest.fixture
def workdir():
    # Under /tmp, not tmp_path: pytest's base directory is closed to the postgres user.
    root = Path(tempfile.mkdtemp(prefix="kubefly-pgbackrest-"))
    _own(root)
    nodes: list[Node] = []
    yield root, nodes
    for node in nodes:
        node.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_archive_backup_and_restore_to_a_time_brings_back_exactly_the_rows_before_it(object_store, workdir):
    if PGBACKREST_BIN is None:
        pytest.fail("pgbackrest is not installed (hack/os-packages.txt)", pytrace=False)
    root, nodes = workdir
    secret = root / "s3-secret"
    secret.write_text(object_store.secret_key)
    secret.chmod(0o600)
    repo = pb.Repository(endpoint=object_store.https_endpoint, bucket=object_store.bucket,
                         access_key_id=object_store.access_key, secret_key_file=secret,
                         ca_file=Path(object_store.ca_file), path_prefix=f"/pg-test-{secrets.token_hex(4)}")
    cluster = "orders-db"

    source = archiving_node(root / "source", repo, cluster, nodes)
    try:
        source.start()
        source.run(pb.stanza_create(source.member), timeout=120)
        source.run(pb.backup(source.member, "full"), timeout=240)

        with source.connect() as conn:
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
            conn.execute("INSERT INTO orders SELECT i, md5(i::text) FROM generate_series(1, 100) i")
            # pgBackRest records a backup's stop in whole seconds and restores to a time only from a backup
            # that stopped before it: the target must lie past the next full second.
            time.sleep(1.5)
            (target,) = conn.execute("SELECT clock_timestamp()").fetchone()
            time.sleep(0.5)
            conn.execute("INSERT INTO orders SELECT i, md5(i::text) FROM generate_series(101, 250) i")
            (segment,) = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        assert isinstance(target, datetime) and SEGMENT.match(segment)

        stanza = wait_for(lambda: (s := source.info()).wal_max >= segment and s, 90,
                            f"WAL segment {segment} in the archive")
        assert stanza.name == cluster and stanza.status_code == 0, stanza
        (full,) = stanza.backups
        assert full.type == "full" and full.label.endswith("F")
        assert full.started <= full.finished and full.finished < target
        assert full.size_bytes > 10_000_000  # an initdb'd cluster is ~20 MB
        assert 0 < full.repo_size_bytes < full.size_bytes  # lz4 compressed
        assert SEGMENT.match(full.wal_start) and SEGMENT.match(full.wal_stop) and full.wal_start <= full.wal_stop
        assert stanza.wal_min <= full.wal_start and stanza.wal_max >= segment
    except BaseException:
        print(source.log_tail())
        raise
    source.stop()  # the restore must come from the object store alone

    restored = Node(root / "restored", repo, cluster)
    nodes.append(restored)
    restored.layout.pgdata.mkdir(mode=0o700)
    _own(restored.layout.pgdata)
    try:
        restored.run(pb.restore(restored.member, "time", pb.format_time(target)), timeout=240)
        # Recovery fetches WAL with the restored member's own config (its spool, its pg1-path).
        auto = (restored.layout.pgdata / "postgresql.auto.conf").read_text()
        assert f"--config={restored.member.config}" in auto and "archive-get" in auto, auto
        # Its postgresql.conf is the source's; this one must not archive into the source's archive.
        restored.start("-c archive_mode=off")
        with restored.connect() as conn:
            wait_for(lambda: not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0], 60, "promotion")
            ids = [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id").fetchall()]
            mismatched = conn.execute("SELECT count(*) FROM orders WHERE note <> md5(id::text)").fetchone()[0]
        assert ids == list(range(1, 101))
        assert mismatched == 0
        logs = [p for node in nodes for p in (node.layout.root / "postgres.log", *node.member.log_dir.glob("*.log"))]
        assert len(logs) > 4  # both servers' logs and pgBackRest's per-command logs
        for path in logs:
            text = path.read_text(errors="replace")
            assert object_store.secret_key not in text and object_store.access_key not in text, path
    except BaseException:
        print(restored.log_tail())
        raise
