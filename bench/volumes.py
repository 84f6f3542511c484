"""Volume copies, a migration and a host drain on kind: snapshots, restore, migrate, drain.

On the kind cluster (`make kind-up`'s, or the one named by --cluster): a Machine
writes 1 GiB of random data into its volume; a Snapshot is applied and timed
from `kubectl apply` to phase Succeeded (the whole user-visible path: the pod's
start on the host, restic, the store); 10 MiB more are written and a second
Snapshot timed the same way; then a new Volume restores the first copy,
timed from apply to Ready (placement on another ams host, the restore pod,
the claim), and a Machine on it checks the data's sha256. Then `kubefly machine
move` migrates the writer with its 1 GiB volume to another host while its app
is asked through the edge proxy every 50 ms: migrate_downtime_s is the window
in which requests failed (the Machine unroutable), and the data's sha256 is
checked on the new host. Last, 10 apps of two machines each and 5 single-machine
apps with a volume start on one ams host and `kubefly host drain` empties it
while every app is asked through the edge proxy (drain_failed_requests counts
the two-machine apps; the volume apps' gaps are their migrations).

Writes bench/results/volumes.json and prints a summary. Not a test: nothing
asserts; the figures go in the closing note.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from e2e.kind.kindlib import TOOLS_BIN, KindCluster  # noqa: E402

RESULTS = REPO / "bench" / "results" / "volumes.json"
API = "kubefly.dev/v1alpha1"
WRITE_GIB = ("import hashlib, os; h = hashlib.sha256(); f = open('/data/blob', 'wb')\n"
             "for _ in range(256):\n    b = os.urandom(4 << 20); h.update(b); f.write(b)\n"
             "f.close(); print(h.hexdigest())")
WRITE_MIB = ("import hashlib, os; b = os.urandom(1 << 20); open('/data/blob', 'wb').write(b); "
             "print(hashlib.sha256(b).hexdigest())")
CHECKSUM_MIB = "import hashlib; print(hashlib.sha256(open('/data/blob', 'rb').read()).hexdigest())"
APPEND_10MIB = "import os; open('/data/more', 'wb').write(os.urandom(10 << 20))"
SERVICES = [{"internalPort": 8080, "ports": [{"port": 80, "handlers": ["http"]}]}]
CHECKSUM = ("import hashlib; h = hashlib.sha256(); f = open('/data/blob', 'rb')\n"
            "for b in iter(lambda: f.read(4 << 20), b''): h.update(b)\nprint(h.hexdigest())")


def log(msg: str) -> None:
    print(f"[bench-volumes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, kind: KindCluster) -> None:
        self.kind = kind
        self.ns = f"bench-vol-{uuid.uuid4().hex[:6]}"

    def get(self, kind_: str, name: str) -> dict | None:
        proc = self.kind.kubectl("-n", self.ns, "get", kind_, name, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def cond(self, obj: dict | None, type_: str) -> dict:
        return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})

    def volume(self, name: str, **spec) -> None:
        self.kind.apply({"apiVersion": API, "kind": "Volume", "metadata": {"name": name},
                         "spec": {"app": "bench", "region": "ams", "sizeGb": 2, **spec}}, self.ns)

    def machine(self, name: str, volume: str, app: str = "bench") -> None:
        self.kind.apply({"apiVersion": API, "kind": "Machine", "metadata": {"name": name},
                         "spec": {"app": app, "region": "ams", "image": self.kind.images["testapp"],
                                  "mounts": [{"volume": volume, "path": "/data"}], "services": SERVICES}}, self.ns)
        self.kind.wait_for(f"{name} started", lambda: (self.cond(self.get("machine", name), "Ready").get("status") == "True"),
                           timeout=300, interval=1)

    def exec(self, machine: str, code: str) -> str:
        return self.kind.kubectl("-n", self.ns, "exec", machine, "-c", "machine", "--", "/opt/kubefly/bin/python", "-c", code,
                                 timeout=600).stdout.strip()

    def snapshot(self, name: str, volume: str) -> tuple[float, dict]:
        started = time.monotonic()
        self.kind.apply({"apiVersion": API, "kind": "Snapshot", "metadata": {"name": name}, "spec": {"volume": volume}}, self.ns)
        snap = self.kind.wait_for(f"snapshot {name}", lambda: (s := self.get("snapshot", name)) and
                                  (s.get("status") or {}).get("phase") in ("Succeeded", "Failed") and s, timeout=600, interval=0.5)
        wall = time.monotonic() - started
        if snap["status"]["phase"] != "Succeeded":
            raise SystemExit(f"snapshot {name} failed: {snap['status'].get('message')}")
        return wall, snap["status"]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).with_name("kubefly")), *args], capture_output=True, text=True,
                              timeout=900, check=check, env={**os.environ, "KUBECONFIG": str(self.kind.kubeconfig)})

    def answer(self, app: str) -> int:
        return self.kind.ask(f"{app}.{self.ns}.kubefly.localhost", timeout=2)

    def migrate(self, machine: str, app: str, digest: str) -> dict:
        """`kubefly machine move` of a running volume Machine, its app asked every 50 ms meanwhile."""
        self.kind.wait_for(f"{app} routed", lambda: self.answer(app) == 200, timeout=120)
        before = self.get("machine", machine)["status"]["host"]
        results: list[tuple[float, int]] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                results.append((time.monotonic(), self.answer(app)))
                time.sleep(0.05)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        started = time.monotonic()
        out = self.cli("machine", "move", machine, "-n", self.ns, "--timeout", "10m", check=False)
        total = time.monotonic() - started
        # Routable again, as the proxy sees it: traffic runs until it answers.
        self.kind.wait_for(f"{app} answers after the move", lambda: results and results[-1][1] == 200, timeout=60,
                           interval=0.2)
        stop.set()
        sender.join()
        failed = [t for t, code in results if code != 200]
        # The Machine is unroutable from its first failed request to the first good one after its last failed one.
        after = next((t for t, code in results if failed and t > failed[-1] and code == 200), None)
        downtime = (after - failed[0]) if failed and after else 0.0
        vol = self.get("volume", self.get("machine", machine)["spec"]["mounts"][0]["volume"])
        record = (vol.get("status") or {}).get("lastMigration") or {}
        log(f"migrate {machine}: exit {out.returncode} in {total:.1f} s; unroutable {downtime:.2f} s "
            f"({len(failed)} of {len(results)} requests failed); operator-side downtime {record.get('downtimeSeconds')} s")
        if out.returncode != 0:
            log(out.stdout + out.stderr)
        mismatch = int(self.exec(machine, CHECKSUM) != digest)
        return {"migrate_downtime_s": round(downtime, 2), "migrate_total_s": round(total, 2), "migrate_exit": out.returncode,
                "migrate_requests": len(results), "migrate_failed_requests": len(failed),
                "migrate_operator_downtime_s": record.get("downtimeSeconds"),
                "migrate_other_host": self.get("machine", machine)["status"]["host"] != before,
                "migrate_checksum_mismatches": mismatch}

    def drain(self, apps: int, volume_apps: int) -> dict:
        """Two machines per app on one ams host (the others cordoned meanwhile), each app asked through the
        edge proxy the whole time, then `kubefly host drain` of that host, timed from the command to its exit."""
        hosts = self.kind.kubectl("get", "nodes", "-l", "topology.kubernetes.io/region=ams", "-o",
                                  "jsonpath={.items[*].metadata.name}").stdout.split()
        target, others = hosts[0], hosts[1:]
        names = [f"dr{a}-{i}" for a in range(apps) for i in (1, 2)]
        stateful = [f"dv{a}-1" for a in range(volume_apps)]
        digests: dict[str, str] = {}
        try:
            for h in others:
                self.cli("host", "cordon", h)
            self.kind.apply([{"apiVersion": API, "kind": "Machine", "metadata": {"name": n},
                              "spec": {"app": n.split("-")[0], "region": "ams", "image": self.kind.images["testapp"],
                                       "guest": {"cpus": 1, "memoryMb": 256}, "services": SERVICES}}
                             for n in names], self.ns)
            for n in stateful:
                self.volume(f"{n}-data", app=n.split("-")[0], sizeGb=1)
                self.machine(n, f"{n}-data", app=n.split("-")[0])
                digests[n] = self.exec(n, WRITE_MIB)
            self.kind.wait_for(f"{len(names)} machines started on {target}", lambda: all(
                self.cond(self.get("machine", n), "Ready").get("status") == "True" for n in names), timeout=600, interval=2)
            for h in others:
                self.cli("host", "uncordon", h)
            results: list[int] = []
            volume_results: list[int] = []
            stop = threading.Event()
            self.kind.wait_for("every app routed", lambda: all(self.answer(f"dr{a}") == 200 for a in range(apps)), timeout=120)

            def traffic() -> None:
                while not stop.is_set():
                    for a in range(apps):
                        results.append(self.answer(f"dr{a}"))
                    for n in stateful:
                        volume_results.append(self.answer(n.split("-")[0]))

            sender = threading.Thread(target=traffic, daemon=True)
            sender.start()
            started = time.monotonic()
            out = self.cli("host", "drain", target, "--deadline", "5m", check=False)
            total = time.monotonic() - started
            stop.set()
            sender.join()
            log(f"drain of {target}: exit {out.returncode} in {total:.1f} s; "
                f"{sum(c != 200 for c in results)} of {len(results)} requests failed")
            if out.returncode != 0:
                log(out.stdout + out.stderr)
            moved_off = sum((self.get("machine", n) or {}).get("status", {}).get("host") != target for n in names + stateful)
            mismatches = sum(self.exec(n, CHECKSUM_MIB) != digests[n] for n in stateful)
            return {"drain_machines": len(names) + len(stateful), "drain_volume_machines": len(stateful),
                    "drain_machines_moved": moved_off, "drain_total_s": round(total, 2),
                    "drain_exit": out.returncode, "drain_requests": len(results),
                    "drain_failed_requests": sum(c != 200 for c in results),
                    "drain_failed_statuses": sorted({c for c in results if c != 200}),
                    "drain_volume_app_requests": len(volume_results),
                    "drain_volume_app_failed_requests": sum(c != 200 for c in volume_results),
                    "drain_checksum_mismatches": mismatches}
        finally:
            for h in hosts:
                self.cli("host", "uncordon", h, check=False)

    def run(self, drain_apps: int, drain_volume_apps: int) -> dict:
        self.kind.kubectl("create", "namespace", self.ns)
        self.volume("src")
        self.machine("writer", "src")
        source_host = self.get("volume", "src")["status"]["host"]
        log(f"writing 1 GiB on {source_host}")
        digest = self.exec("writer", WRITE_GIB)
        first_wall, first = self.snapshot("first", "src")
        log(f"first snapshot: {first_wall:.1f} s ({first['bytes']} bytes, {first['consistency']}, frozen {first['frozenSeconds']} s)")
        self.exec("writer", APPEND_10MIB)
        incr_wall, incr = self.snapshot("incremental", "src")
        log(f"incremental snapshot: {incr_wall:.1f} s ({incr['addedBytes']} bytes new)")

        started = time.monotonic()
        self.volume("restored", restoreFrom="first")
        restored = self.kind.wait_for("restored volume Ready", lambda: (v := self.get("volume", "restored")) and
                                      self.cond(v, "Ready").get("status") == "True" and v, timeout=600, interval=0.5)
        restore_wall = time.monotonic() - started
        log(f"restore on {restored['status']['host']}: {restore_wall:.1f} s")
        self.machine("reader", "restored")
        mismatches = int(self.exec("reader", CHECKSUM) != digest)
        self.kind.kubectl("-n", self.ns, "delete", "machine", "reader", "--wait=true", timeout=300)
        migrated = self.migrate("writer", "bench", digest)
        self.kind.kubectl("-n", self.ns, "delete", "machine", "writer", "--wait=true", timeout=300)
        drained = self.drain(drain_apps, drain_volume_apps) if drain_apps else {}
        mismatches += migrated["migrate_checksum_mismatches"] + drained.get("drain_checksum_mismatches", 0)
        return {
            "snapshot_1gib_first_s": round(first_wall, 2),
            "snapshot_1gib_first_restic_s": first["durationSeconds"],
            "snapshot_1gib_frozen_s": first["frozenSeconds"],
            "snapshot_consistency": first["consistency"],
            "snapshot_incremental_10mib_s": round(incr_wall, 2),
            "snapshot_incremental_restic_s": incr["durationSeconds"],
            "snapshot_incremental_frozen_s": incr["frozenSeconds"],
            "snapshot_incremental_added_bytes": incr["addedBytes"],
            "restore_1gib_other_host_s": round(restore_wall, 2),
            "restore_1gib_restic_s": restored["status"]["restoredFrom"]["durationSeconds"],
            "restore_other_host": restored["status"]["host"] != source_host,
            "data_checksum_mismatches": mismatches,
            **migrated,
            **drained,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default="kubefly", help="kind cluster name (make kind-up's is 'kubefly')")
    ap.add_argument("--keep", action="store_true", help="keep the bench namespace afterwards")
    ap.add_argument("--drain-apps", type=int, default=10, help="apps of two machines each for the drain (0: no drain)")
    ap.add_argument("--drain-volume-apps", type=int, default=5, help="single-machine apps with a volume in the drain")
    args = ap.parse_args()
    subprocess.run(["bash", str(REPO / "hack" / "kind" / "up.sh"), "--name", args.cluster], check=True, stdout=subprocess.DEVNULL)
    kcache = Path(TOOLS_BIN).parent / "kind"
    images = dict(line.split("=", 1) for line in (kcache / f"{args.cluster}.images").read_text().split())
    bench = Bench(KindCluster(args.cluster, kcache / f"{args.cluster}.kubeconfig", images))
    try:
        result = bench.run(args.drain_apps, args.drain_volume_apps)
    finally:
        if not args.keep:
            bench.kind.kubectl("delete", "namespace", bench.ns, "--wait=false", check=False)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("\nvolumes:")
    for key, value in result.items():
        print(f"  {key:36} {value}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
