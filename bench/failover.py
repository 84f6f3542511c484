"""Postgres failover under write load: ten SIGKILLs of the primary, write gap and acknowledged writes lost.

Three real members (Debian postgres-15 + repmgr, `kubefly postgres member`) and
the primary endpoint run on loopback, synchronous replication on. A writer
inserts ids through the endpoint as fast as it can and records every
acknowledged commit. For each kill: write gap = first acknowledged write after
the kill minus last acknowledged write before it; then the killed member is
restarted and the time until it streams again as a standby is taken. At the
end every acknowledged id is looked up on the primary. Throughout, every
member's /health is sampled every 0.1 s and any sample with two writable
primaries is counted (it must stay 0).

KUBEFLY_BENCH_STOP=graceful stops the primary as the kubelet stops a pod
(SIGTERM to the member, which hands over to a standby before it stops; SIGKILL
after the grace period) instead of killing it, and writes
bench/results/failover-graceful.json.

Writes bench/results/failover.json and prints a summary.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
from kubefly.postgres.localcluster import LocalCluster, remove  # noqa: E402

KILLS = int(os.environ.get("KUBEFLY_BENCH_KILLS", "10"))
GRACEFUL = os.environ.get("KUBEFLY_BENCH_STOP", "kill") == "graceful"
RESULTS = Path(__file__).resolve().parent / "results" / ("failover-graceful.json" if GRACEFUL else "failover.json")


class Writer(threading.Thread):
    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.acked: list[tuple[int, float, int]] = []  # id, when acknowledged, port of the postgres that took it
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        n, conn, server = 0, None, 0
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=3)
                    server = conn.execute("SELECT inet_server_port()").fetchone()[0]
                n += 1
                conn.execute("INSERT INTO writes (id) VALUES (%s)", (n,))
                with self.lock:
                    self.acked.append((n, time.monotonic(), server))
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.02)

    def last_on(self, port: int) -> float | None:
        with self.lock:
            times = [at for _, at, server in self.acked if server == port]
        return times[-1] if times else None

    def last_server(self) -> int | None:
        with self.lock:
            return self.acked[-1][2] if self.acked else None

    def first_elsewhere(self, port: int, t: float) -> float | None:
        """The first write acknowledged after `t` by another postgres than the killed one."""
        with self.lock:
            return next((at for _, at, server in self.acked if at > t and server != port), None)


class Sampler(threading.Thread):
    """Polls every member's /health; counts samples where more than one member says writable."""

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.samples = 0
        self.two_writable: list[list[str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            writable = sorted(n for n, h in self.cluster.healths().items() if h and h["writable"])
            self.samples += 1
            if len(writable) > 1:
                self.two_writable.append(writable)
            time.sleep(0.1)


def reclones(root: Path, name: str) -> int:
    """Times the member fell back to a fresh clone because its rejoin (pg_rewind) failed."""
    log = root / f"{name}.member.log"
    return log.read_text(errors="replace").count("rejoin failed, cloning afresh") if log.exists() else 0


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="kubefly-bench-pg-"))
    cluster = LocalCluster(root, synchronous=True)
    kills = []
    writer = sampler = None
    finished = False
    try:
        cluster.start(timeout=120)
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE writes (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())")
        writer = Writer(cluster.dsn())
        writer.start()
        sampler = Sampler(cluster)
        sampler.start()
        for i in range(KILLS):
            primary = cluster.wait_healthy(120)
            time.sleep(2)  # steady load before the kill
            port = cluster.member(primary).pg_port
            killed_at = time.monotonic()
            stopping = threading.Thread(target=cluster.terminate if GRACEFUL else cluster.kill, args=(primary,))
            stopping.start()
            deadline = killed_at + 120
            while writer.first_elsewhere(port, killed_at) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            stopping.join()
            # Acknowledgements racing the kill count as before it: they were committed on the old primary.
            before, after = writer.last_on(port), writer.first_elsewhere(port, killed_at)
            gap = None if before is None or after is None else after - before
            new = next((m.name for m in cluster.members if m.pg_port == writer.last_server()), None)
            restarted_at = time.monotonic()
            clones_before = reclones(root, primary)
            cluster.start_member(primary)
            cluster.wait_healthy(120)
            rejoin = time.monotonic() - restarted_at
            kills.append({"killed": primary, "new_primary": new, "write_gap_s": gap and round(gap, 3),
                          "standby_again_s": round(rejoin, 3),
                          "rejoin": "re-cloned" if reclones(root, primary) > clones_before else "rewound"})
            gap_text = "none (no write came back)" if gap is None else f"{gap:.2f}s"
            print(f"{'stop' if GRACEFUL else 'kill'} {i + 1}/{KILLS}: {primary} -> {new}, write gap {gap_text}, "
                  f"old primary streaming again after {rejoin:.1f}s ({kills[-1]['rejoin']})", flush=True)
        writer.stop.set()
        writer.join(10)
        sampler.stop.set()
        sampler.join(10)
        primary = cluster.wait_healthy(60)
        with psycopg.connect(cluster.member_dsn(primary), autocommit=True) as conn:
            stored = {row[0] for row in conn.execute("SELECT id FROM writes")}
        acked = {n for n, _, _ in writer.acked}
        finished = True
    finally:
        for t in (writer, sampler):
            if t is not None:
                t.stop.set()
        cluster.stop()
        if finished:
            remove(root)
        else:
            print(f"member logs kept in {root}", file=sys.stderr)

    gaps = [k["write_gap_s"] for k in kills if k["write_gap_s"] is not None]
    result = {
        "kills": len(kills),
        "stop": "graceful (SIGTERM: hand-over, then stop)" if GRACEFUL else "SIGKILL",
        "synchronous": True,
        "write_gap_p50_s": round(statistics.median(gaps), 3),
        "write_gap_max_s": round(max(gaps), 3),
        "acknowledged_writes": len(acked),
        "acknowledged_writes_lost": len(acked - stored),
        "standby_again_max_s": max(k["standby_again_s"] for k in kills),
        "standby_again_p50_s": round(statistics.median(k["standby_again_s"] for k in kills), 3),
        "rejoins_recloned": sum(k["rejoin"] == "re-cloned" for k in kills),
        "health_samples": sampler.samples,
        "two_writable_samples": len(sampler.two_writable),
        "targets": {"write_gap_p50_s": 5, "write_gap_max_s": 10, "acknowledged_writes_lost": 0, "standby_again_s": 60},
        "per_kill": kills,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfailover: {len(kills)} primary {'graceful stops' if GRACEFUL else 'kills'}, synchronous replication, {len(acked)} acknowledged writes")
    print(f"  write gap p50 {result['write_gap_p50_s']}s (target <= 5s), max {result['write_gap_max_s']}s (target <= 10s)")
    print(f"  acknowledged writes lost: {result['acknowledged_writes_lost']} (target 0)")
    print(f"  old primary a standby again within {result['standby_again_max_s']}s (target <= 60s)")
    print(f"  samples with two writable primaries: {result['two_writable_samples']} of {sampler.samples} (must be 0)")
    print(f"  anchors: CloudNativePG <= 10s on kind, repmgr defaults ~60s, Patroni 30-45s; load {result['load_average_1m']}")
    print(f"  -> {RESULTS}")
    ok = (result["write_gap_p50_s"] <= 5 and result["write_gap_max_s"] <= 10
          and result["acknowledged_writes_lost"] == 0 and result["standby_again_max_s"] <= 60
          and result["two_writable_samples"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
