"""Postgres backups: base backup of ~1 GiB, WAL archive lag under writes, point-in-time restore,
RPO after losing every member and volume, switchover write gap.

Real parts on loopback: the S3 server (kubefly.objectstore.localstore, over TLS), three
members with archiving (kubefly.objectstore + pgBackRest, as on the platform) and the primary
endpoint. Steps:
1. load KUBEFLY_BENCH_GIB (default 1) of rows, then a full backup through the member's
   /backup: base_backup_1gib_s (and the database's size);
2. a writer inserts through the endpoint for KUBEFLY_BENCH_WAL_MINUTES (default 10) while the
   primary's /health is sampled every second: wal_archive_lag_p99_s, where a sample is the
   seconds since the last segment was archived while segments wait (0 when none wait);
   at the middle a time is noted (the PITR target); at three quarters a switchover to a
   standby: switchover_write_gap_s (last write acknowledged before it to the first after);
3. every member is killed and its directory removed (the cluster and its volumes are gone);
4. a new one-member cluster restores the noted time: restore_1gib_plus_wal_s (applied to
   Healthy) and rows_lost_at_target (rows committed before the target that it lacks, plus
   rows after it that it has: must be 0);
5. another restores `latest`: rpo_s, the time between the last acknowledged commit and the
   last one it has (0 when none is lost), and rows_lost.

Writes bench/results/backup.json and prints a summary.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from kubefly.objectstore import localstore  # noqa: E402
from kubefly.postgres import pgbackrest as pb  # noqa: E402
from kubefly.postgres.localcluster import LocalCluster  # noqa: E402

GIB = float(os.environ.get("KUBEFLY_BENCH_GIB", "1"))
WAL_MINUTES = float(os.environ.get("KUBEFLY_BENCH_WAL_MINUTES", "10"))
RESULTS = Path(__file__).resolve().parent / "results" / "backup.json"
ROW_BYTES = 1000


def log(msg: str) -> None:
    print(f"[bench-backup {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


class Writer(threading.Thread):
    """Inserts ids through the endpoint; records when each commit was acknowledged."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.acked, self.stop = dsn, [], threading.Event()

    def run(self) -> None:
        n, conn = 0, None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=3)
                n += 1
                conn.execute("INSERT INTO ledger (id, pad) VALUES (%s, repeat('x', 200))", (n,))
                self.acked.append((n, time.monotonic()))
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)


def archive_env(store, cluster: str) -> dict[str, str]:
    return {"KUBEFLY_PG_ARCHIVE_ENDPOINT": store.https_endpoint, "KUBEFLY_PG_ARCHIVE_BUCKET": store.bucket,
            "KUBEFLY_PG_ARCHIVE_PATH": "/postgres/bench", "KUBEFLY_PG_CLUSTER": cluster,
            "KUBEFLY_PG_ARCHIVE_ACCESS_KEY_ID": store.access_key, "KUBEFLY_PG_ARCHIVE_SECRET_KEY": store.secret_key,
            "KUBEFLY_PG_ARCHIVE_CA_FILE": store.ca_file}


def archive(c: LocalCluster, name: str) -> dict:
    return (c.health(name) or {}).get("archive") or {}


def restore_into(root: Path, store, source: str, system_id: str, kind: str, target: str | None) -> tuple[LocalCluster, float]:
    env = {**archive_env(store, f"r{secrets.token_hex(3)}"), "KUBEFLY_PG_RESTORE_FROM": source,
           "KUBEFLY_PG_RESTORE_SYSTEM_ID": system_id, "KUBEFLY_PG_RESTORE_TYPE": kind}
    if target is not None:
        env["KUBEFLY_PG_RESTORE_TARGET"] = target
    c = LocalCluster(root, members=1, member_env=env)
    started = time.monotonic()
    c.start(timeout=3600)
    return c, time.monotonic() - started


def main() -> None:
    if (why := localstore.problem()) is not None:
        sys.exit(why)
    work = Path(tempfile.mkdtemp(prefix="kubefly-bench-backup-"))
    work.chmod(0o755)  # the members run as the postgres user
    out: dict = {"gib": GIB, "wal_minutes": WAL_MINUTES}
    try:
        with localstore.running() as store:
            src = LocalCluster(work / "src", members=3, member_env=archive_env(store, "bsrc"))
            src.start(timeout=180)
            primary = src.wait_healthy(60)
            wait(lambda: archive(src, primary).get("stanza") == "ready", 120, "stanza ready")
            rows = int(GIB * 1024**3 / (ROW_BYTES + 40))
            log(f"loading {rows} rows (~{GIB} GiB)")
            with psycopg.connect(src.dsn(), autocommit=True) as conn:
                conn.execute("CREATE TABLE big (id bigint PRIMARY KEY, pad text)")
                conn.execute("ALTER TABLE big ALTER pad SET STORAGE PLAIN")  # no compression: real bytes
                step = 100_000
                for lo in range(1, rows + 1, step):
                    conn.execute("INSERT INTO big SELECT g, repeat(md5(g::text), %s) FROM generate_series(%s, %s) g",
                                 (ROW_BYTES // 32, lo, min(rows, lo + step - 1)))
                conn.execute("CREATE TABLE ledger (id bigint PRIMARY KEY, pad text, at timestamptz DEFAULT clock_timestamp())")
                out["database_bytes"] = conn.execute("SELECT pg_database_size('postgres')").fetchone()[0]
            primary = src.wait_healthy(120)
            log(f"database {out['database_bytes'] / 1024**3:.2f} GiB; full backup on {primary}")
            started = time.monotonic()
            code, answer = src.admin_post(primary, "/backup", {"id": "bench", "type": "full"})
            assert code == 202, answer
            done = wait(lambda: (b := archive(src, primary).get("backup")) and b["state"] != "running" and b, 3600,
                        "backup", interval=0.2)
            assert done["state"] == "completed", done
            out["base_backup_1gib_s"] = round(time.monotonic() - started, 1)
            out["base_backup_bytes"], out["base_backup_repo_bytes"] = done["size_bytes"], done["repo_size_bytes"]
            log(f"backup {out['base_backup_1gib_s']} s ({done['size_bytes'] / 1024**3:.2f} GiB, "
                f"{done['repo_size_bytes'] / 1024**2:.0f} MiB in the store)")

            writer = Writer(src.dsn())
            writer.start()
            lags, target, switchover_gap = [], None, None
            began, length = time.monotonic(), WAL_MINUTES * 60
            while (elapsed := time.monotonic() - began) < length:
                now_primary = src.primary()
                rep = archive(src, now_primary) if now_primary else {}
                if rep.get("pending_segments") is not None:
                    lags.append((rep.get("last_archived_age_s") or 0.0) if rep["pending_segments"] > 0 else 0.0)
                if target is None and elapsed >= length / 2:
                    with psycopg.connect(src.dsn(), autocommit=True) as conn:
                        target = conn.execute("SELECT clock_timestamp()").fetchone()[0]
                    log(f"target {target}")
                if switchover_gap is None and elapsed >= 3 * length / 4 and now_primary:
                    to = next(m.name for m in src.members if m.name != now_primary)
                    asked = time.monotonic()
                    code, answer = src.admin_post(to, "/switchover", timeout=180)
                    assert code == 200, answer
                    answered = time.monotonic()
                    wait(lambda: writer.acked[-1][1] > answered + 1, 60, "writes after the switchover", 0.05)
                    # The longest wait between two acknowledged writes while it ran.
                    times = [t for _, t in writer.acked if asked - 1 <= t <= answered + 1]
                    switchover_gap = max(b - a for a, b in zip(times, times[1:]))
                    log(f"switchover to {to}: longest write gap {switchover_gap:.2f} s")
                time.sleep(1)
            with psycopg.connect(src.dsn(), autocommit=True) as conn:
                before_target = conn.execute("SELECT count(*) FROM ledger WHERE at <= %s", (target,)).fetchone()[0]
                system_id = archive(src, src.primary() or primary)["path"].rsplit("/", 1)[1]
            # The disaster strikes mid-write: nothing closes the last segment but archive_timeout.
            writer.stop.set()
            writer.join(10)
            acked = list(writer.acked)
            last_id, last_at = acked[-1]
            out["wal_archive_lag_p99_s"] = round(statistics.quantiles(lags, n=100)[98], 2) if len(lags) >= 2 else None
            out["switchover_write_gap_s"] = round(switchover_gap, 2) if switchover_gap is not None else None
            out["writes_acknowledged"] = len(acked)

            # Everything goes at once: members and their directories (volumes).
            killed_at = time.monotonic()
            for m in src.members:
                src.kill(m.name)
            src.stop()
            for m in src.members:
                shutil.rmtree(m.data_dir, ignore_errors=True)
            log(f"every member and volume gone {time.monotonic() - killed_at:.1f}s after the last write")

            pitr, took = restore_into(work / "pitr", store, "bsrc", system_id, "time", pb.format_time(target))
            out["restore_1gib_plus_wal_s"] = round(took, 1)
            with psycopg.connect(pitr.dsn(), autocommit=True) as conn:
                have = conn.execute("SELECT count(*) FROM ledger").fetchone()[0]
                after_target = conn.execute("SELECT count(*) FROM ledger WHERE at > %s", (target,)).fetchone()[0]
            out["rows_lost_at_target"] = (before_target - (have - after_target)) + after_target
            log(f"restored to the target in {took:.1f} s: {have} rows, {before_target} committed before it")
            pitr.stop()

            latest, took = restore_into(work / "latest", store, "bsrc", system_id, "default", None)
            with psycopg.connect(latest.dsn(), autocommit=True) as conn:
                top = conn.execute("SELECT coalesce(max(id), 0) FROM ledger").fetchone()[0]
            latest.stop()
            lost = [(n, at) for n, at in acked if n > top]
            at_of = dict(acked)
            out["rows_lost"] = len(lost)
            out["rpo_s"] = round(last_at - at_of[top], 2) if lost and top in at_of else (0.0 if not lost else None)
            out["restore_latest_s"] = round(took, 1)
            log(f"latest: up to id {top} of {last_id}: {len(lost)} acknowledged rows lost")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
