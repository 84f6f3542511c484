"""Soak on kind: random faults from a seeded schedule under constant traffic, as reliability figures.

On the kind cluster (`make kind-up`'s, or the one named by --cluster), for a
bounded time: control-plane pauses of 10-90 s, the active operator replica
killed, a worker stopped and started, a Postgres member's container killed,
a host agent restarted. Meanwhile HTTP requests go through the mapped proxy
port to an app with machines on two hosts, and a writer pod inserts ids into a
synchronous PostgresCluster through `pg-primary`, logging every acknowledged
commit. Every second a sampler counts, without the API server (straight to
each operator pod's /metrics through a node), the replicas that say they are
active, and, when the API answers, Machines with more than one live pod.
120 s after the last fault every object must have converged.

The writer runs on the syd worker, which is never stopped (its log of
acknowledged ids must outlive the run). The edge worker may be stopped: while
it is down (and its first minute back) no request can arrive, and failures then
are counted apart, as `failed_requests` minus
`failed_requests_excluding_host_loss_window`.

Writes bench/results/soak.json and prints a summary. Not a test: nothing
asserts; the figures go in the closing note.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from e2e.kind.kindlib import RELEASE_NAMESPACE, KindCluster, TOOLS_BIN  # noqa: E402

RESULTS = REPO / "bench" / "results" / "soak.json"
DOMAIN = "kubefly.localhost"
FAULTS = ("control_plane_pause", "operator_killed", "worker_restart", "postgres_member_killed", "agent_restart")
CONVERGE_S = 120


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Soak:
    def __init__(self, kind: KindCluster, seed: int, duration: float) -> None:
        self.kind, self.rng, self.duration = kind, random.Random(seed), duration
        self.seed = seed
        self.ns = f"soak-{uuid.uuid4().hex[:6]}"
        self.stop = threading.Event()
        self.requests: list[tuple[float, bool]] = []
        self.windows: list[tuple[float, float]] = []  # edge host down (+ its boot): no entry point
        self.faults: Counter[str] = Counter()
        self.fault_log: list[dict] = []
        self.two_active = 0
        self.active_samples = 0
        self.duplicate_pods = 0
        self.pod_uids: dict[str, set[str]] = {}
        self.cp = f"{kind.name}-control-plane"
        nodes = json.loads(kind.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        self.region = {n["metadata"]["name"]: n["metadata"]["labels"].get("topology.kubernetes.io/region")
                       for n in nodes if n["metadata"]["name"] != self.cp}
        self.edge = next(n["metadata"]["name"] for n in nodes if n["metadata"]["labels"].get("kubefly.dev/edge") == "true")
        self.writer_host = next(h for h, r in self.region.items() if r == "syd")

    # ---- setup ---------------------------------------------------------------
    def machine(self, name: str, region: str) -> dict:
        return {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine", "metadata": {"name": name},
                "spec": {"app": "soak", "region": region, "image": self.kind.images["testapp"],
                         "guest": {"cpuKind": "shared", "cpus": 1, "memoryMb": 256},
                         "services": [{"internalPort": 8080, "protocol": "tcp",
                                       "ports": [{"port": 80, "handlers": ["http"]}]}]}}

    def setup(self) -> None:
        k = self.kind
        k.kubectl("create", "namespace", self.ns)
        k.apply([self.machine("soak-1", "ams"), self.machine("soak-2", "iad"),
                 {"apiVersion": "kubefly.dev/v1alpha1", "kind": "PostgresCluster", "metadata": {"name": "pg"},
                  "spec": {"app": "db", "region": "ams", "members": 3, "volumeSizeGb": 1, "synchronous": True}}], self.ns)
        self.wait("both app machines started", self.machines_settled, 300)
        self.wait("PostgresCluster pg Healthy", self.pg_healthy, 420)
        secret = self.wait("pg-credentials", lambda: self.get("secret", "pg-credentials"), 60)
        uri = base64.b64decode(secret["data"]["uri"]).decode()
        script = (
            "until psql \"$URI\" -XAtq -c 'CREATE TABLE IF NOT EXISTS soak (id int PRIMARY KEY)'; do sleep 1; done; "
            "i=1; while true; do "
            "if psql \"$URI\" -XAtq -v ON_ERROR_STOP=1 -c \"INSERT INTO soak VALUES ($i) ON CONFLICT DO NOTHING\" >/dev/null 2>&1; "
            "then echo \"ack $i\"; i=$((i+1)); else sleep 0.2; fi; sleep 0.05; done")
        k.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "writer"},
                 "spec": {"nodeName": self.writer_host, "restartPolicy": "Never",
                          "containers": [{"name": "writer", "image": self.kind.images["postgres"], "command": ["bash", "-c", script],
                                          "env": [{"name": "URI", "value": uri}, {"name": "PGCONNECT_TIMEOUT", "value": "3"},
                                                  {"name": "PGOPTIONS", "value": "-c statement_timeout=5000"}]}]}}, self.ns)
        self.wait("the writer's first acknowledged write", lambda: "ack 1" in self.writer_log(), 120)

    # ---- observation ---------------------------------------------------------
    def get(self, *what: str) -> dict | None:
        """The objects, or None while the API server does not answer (a paused control plane)."""
        try:
            p = self.kind.kubectl("-n", self.ns, "get", *what, "-o", "json", check=False, timeout=15)
        except subprocess.TimeoutExpired:
            return None
        return json.loads(p.stdout) if p.returncode == 0 else None

    def wait(self, what: str, probe, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if v := probe():
                    return v
            except (subprocess.TimeoutExpired, json.JSONDecodeError):
                pass
            time.sleep(2)
        raise SystemExit(f"soak setup: timed out after {timeout:.0f}s waiting for {what}")

    def machines_settled(self) -> bool:
        # The app's own: the PostgresCluster's members are Machines of the same namespace too.
        ms = [m for m in (self.get("machines") or {}).get("items") or [] if m["spec"].get("app") == "soak"]
        ready = lambda m: next((c["status"] == "True" for c in m.get("status", {}).get("conditions") or []
                                if c["type"] == "Ready"), False)
        return len(ms) == 2 and all(m.get("status", {}).get("state") == "started" and ready(m) for m in ms)

    def pg_healthy(self) -> bool:
        s = (self.get("postgrescluster", "pg") or {}).get("status") or {}
        return s.get("phase") == "Healthy" and len(s.get("members") or []) == 3 and all(m["ready"] for m in s["members"])

    def writer_log(self) -> str:
        return self.kind.kubectl("-n", self.ns, "logs", "writer", check=False, timeout=30).stdout

    def traffic(self) -> None:
        url = f"http://127.0.0.1:{self.kind.host_port(8080)}/"
        host = f"soak.{self.ns}.{DOMAIN}"
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=5) as r:
                    ok = r.status == 200
            except (urllib.error.URLError, OSError, TimeoutError):
                ok = False
            self.requests.append((t, ok))
            self.stop.wait(max(0.0, 0.1 - (time.monotonic() - t)))

    def operator_ips(self) -> list[str]:
        try:
            p = self.kind.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator",
                                  "-o", "jsonpath={.items[*].status.podIP}", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return []  # the API server is paused: sample the replicas last known
        return p.stdout.split() if p.returncode == 0 else []

    def sample(self) -> None:
        """Every second: replicas that report themselves active (no API server on this path), and
        Machines with two live pods at once (when the API answers)."""
        ips: list[str] = []
        probe = ("import sys,urllib.request\nfor ip in sys.argv[1:]:\n try:\n"
                 "  b=urllib.request.urlopen(f'http://{ip}:9090/metrics',timeout=1).read().decode()\n"
                 "  print(ip, any(l.startswith('kubefly_operator_leader ') and float(l.split()[1])==1 for l in b.splitlines()))\n"
                 " except Exception: print(ip, 'down')")
        n = 0
        while not self.stop.is_set():
            if n % 10 == 0 or not ips:
                ips = self.operator_ips() or ips
            n += 1
            try:
                p = subprocess.run(["docker", "exec", self.writer_host, "python3", "-c", probe, *ips],
                                   capture_output=True, text=True, timeout=10) if ips else None
            except subprocess.TimeoutExpired:
                p = None  # no sample this second (counted in operator_samples only when taken)
            if p is not None:
                active = sum(line.endswith(" True") for line in p.stdout.splitlines())
                self.active_samples += 1
                self.two_active += active > 1
            pods = self.get("pods", "-l", "app.kubernetes.io/managed-by=kubefly")
            if pods:
                live = Counter()
                for pod in pods["items"]:
                    name = (pod["metadata"].get("labels") or {}).get("kubefly.dev/machine") or pod["metadata"]["name"]
                    self.pod_uids.setdefault(name, set()).add(pod["metadata"]["uid"])
                    if not pod["metadata"].get("deletionTimestamp") and pod["status"].get("phase") in ("Pending", "Running"):
                        live[name] += 1
                self.duplicate_pods += sum(1 for c in live.values() if c > 1)
            self.stop.wait(1)

    # ---- faults --------------------------------------------------------------
    def docker(self, *args: str) -> None:
        subprocess.run(["docker", *args], check=True, capture_output=True, timeout=120)

    def fault(self, kind: str) -> dict:
        rng, k = self.rng, self.kind
        if kind == "control_plane_pause":
            seconds = rng.uniform(10, 90)
            self.docker("pause", self.cp)
            try:
                time.sleep(seconds)
            finally:
                self.docker("unpause", self.cp)
            return {"seconds": round(seconds, 1)}
        if kind == "operator_killed":
            pods = json.loads(k.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator",
                                        "-o", "json").stdout)["items"]
            pod = rng.choice(sorted(p["metadata"]["name"] for p in pods))
            k.kubectl("-n", RELEASE_NAMESPACE, "delete", "pod", pod, "--grace-period=0", "--force")
            return {"pod": pod}
        if kind == "worker_restart":
            host = rng.choice(sorted(h for h in self.region if h != self.writer_host))
            down = rng.uniform(20, 60)
            t0 = time.monotonic()
            self.docker("stop", host)
            try:
                time.sleep(down)
            finally:
                self.docker("start", host)
            if host == self.edge:
                self.windows.append((t0, time.monotonic() + 60))
            return {"host": host, "seconds": round(down, 1)}
        if kind == "postgres_member_killed":
            pods = (self.get("pods", "-l", "kubefly.dev/pg-cluster=pg") or {}).get("items") or []
            running = [(p["spec"]["nodeName"], c["containerID"]) for p in pods for c in p["status"].get("containerStatuses") or []
                       if c["name"] == "machine" and "running" in c["state"] and p["spec"].get("nodeName")]
            if not running:
                return {"skipped": "no running member"}
            node, cid = rng.choice(sorted(running))
            self.docker("exec", node, "ctr", "-n", "k8s.io", "tasks", "kill", "--signal", "SIGKILL", cid.removeprefix("containerd://"))
            return {"host": node}
        if kind == "agent_restart":
            pods = json.loads(k.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=agent",
                                        "-o", "json").stdout)["items"]
            pod = rng.choice(sorted(p["metadata"]["name"] for p in pods))
            k.kubectl("-n", RELEASE_NAMESPACE, "delete", "pod", pod, "--wait=false")
            return {"pod": pod}
        raise ValueError(kind)

    def api_up(self) -> bool:
        return self.kind.kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0

    def run(self) -> dict:
        self.setup()
        threads = [threading.Thread(target=f, daemon=True) for f in (self.traffic, self.sample)]
        for t in threads:
            t.start()
        started = time.monotonic()
        last_fault = started
        while time.monotonic() - started < self.duration:
            self.stop.wait(self.rng.uniform(20, 60))
            if time.monotonic() - started >= self.duration:
                break
            self.wait("the API server between faults", self.api_up, 300)
            kind = self.rng.choice(FAULTS)
            log(f"fault {kind}")
            try:
                detail = self.fault(kind)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, AssertionError) as e:
                detail = {"error": str(e)[:200]}
            self.faults[kind] += 1
            self.fault_log.append({"kind": kind, "at_s": round(time.monotonic() - started, 1), **detail})
            log(f"  {detail}")
            last_fault = time.monotonic()
        stuck = self.converge(last_fault)
        self.stop.set()
        for t in threads:
            t.join(timeout=30)
        return self.report(stuck, time.monotonic() - started)

    def converge(self, last_fault: float) -> list[str]:
        deadline = last_fault + CONVERGE_S
        while time.monotonic() < deadline:
            if self.api_up() and self.machines_settled() and self.pg_healthy():
                return []
            time.sleep(3)
        stuck = [] if self.machines_settled() else ["machines"]
        return stuck + ([] if self.pg_healthy() else ["postgrescluster/pg"])

    def report(self, stuck: list[str], elapsed: float) -> dict:
        acked = {int(line.split()[1]) for line in self.writer_log().splitlines() if line.startswith("ack ")}
        present = set()
        pods = (self.get("pods", "-l", "kubefly.dev/pg-cluster=pg") or {}).get("items") or []
        secret = self.get("secret", "pg-credentials")
        if secret and pods:
            uri = base64.b64decode(secret["data"]["uri"]).decode()
            p = self.kind.kubectl("-n", self.ns, "exec", "writer", "--", "psql", uri, "-XAtq", "-c", "SELECT id FROM soak",
                                  check=False, timeout=60)
            present = {int(x) for x in p.stdout.split()} if p.returncode == 0 else set()
        in_window = lambda t: any(a <= t <= b for a, b in self.windows)
        failed = [t for t, ok in self.requests if not ok]
        result = {
            "seed": self.seed, "duration_s": round(elapsed), "faults": dict(self.faults), "fault_log": self.fault_log,
            "requests": len(self.requests), "failed_requests": len(failed),
            "failed_requests_excluding_host_loss_window": sum(1 for t in failed if not in_window(t)),
            "acknowledged_writes": len(acked), "acknowledged_writes_lost": len(acked - present) if present else None,
            "duplicate_pods": self.duplicate_pods,
            "pods_replaced": {m: len(u) - 1 for m, u in self.pod_uids.items() if len(u) > 1},
            "stuck_objects": len(stuck), "stuck": stuck,
            "two_active_operators_samples": self.two_active, "operator_samples": self.active_samples,
        }
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default="kubefly", help="kind cluster name (make kind-up's is 'kubefly')")
    ap.add_argument("--duration", type=float, default=900, help="seconds of faults (default 15 min)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the soak namespace afterwards")
    args = ap.parse_args()
    subprocess.run(["bash", str(REPO / "hack" / "kind" / "up.sh"), "--name", args.cluster], check=True, stdout=subprocess.DEVNULL)
    kcache = Path(TOOLS_BIN).parent / "kind"
    images = dict(line.split("=", 1) for line in (kcache / f"{args.cluster}.images").read_text().split())
    soak = Soak(KindCluster(args.cluster, kcache / f"{args.cluster}.kubeconfig", images), args.seed, args.duration)
    try:
        result = soak.run()
    finally:
        soak.stop.set()
        if not args.keep:
            soak.kind.kubectl("delete", "namespace", soak.ns, "--wait=false", check=False)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsoak (seed {result['seed']}, {result['duration_s']} s): faults {result['faults']}")
    for key in ("requests", "failed_requests", "failed_requests_excluding_host_loss_window", "acknowledged_writes",
                "acknowledged_writes_lost", "duplicate_pods", "stuck_objects", "two_active_operators_samples"):
        print(f"  {key:45} {result[key]}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
