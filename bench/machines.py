"""Machines benchmark on the local control plane (kwok hosts).

The kind-config hosts plus --hosts simulated ones (regions ams/iad/syd), the
chart installed, `kubefly operator` running as its ServiceAccount. Two passes:

  steady: --steady machines created at --rate per second; apply -> started latency (p50/p99)
  burst:  --count machines created at once; time until all are started
  host loss: a started machine's host stops (devcluster.stop_host: heartbeats
          and Lease renewals end); time until the Machine's HostReady=False
          condition (the controller-manager's 40 s grace is most of it)

Apply time is taken just before each create call; started time is when the
bench's watch first sees status.state == started. Peak RSS is the operator's
VmHWM. Writes bench/results/machines.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from kubefly import GROUP, VERSION  # noqa: E402
from kubefly.devcluster import TOOLS_BIN, LocalCluster  # noqa: E402
from kubefly.labels import NODE_REGION  # noqa: E402
from kubefly.ports import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "machines.json"
REGIONS = ("ams", "iad", "syd")
NAMESPACES = ("bench-steady", "bench-burst", "bench-host-loss")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


class Watcher:
    """Records when each machine is first seen started."""

    def __init__(self, custom, namespace: str):
        self.started: dict[str, float] = {}
        self._custom, self._ns, self._stop = custom, namespace, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from kubernetes import watch

        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import ProtocolError

        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(self._custom.list_namespaced_custom_object, GROUP, VERSION, self._ns, "machines",
                                   timeout_seconds=30):
                    obj = ev["object"]
                    if (obj.get("status") or {}).get("state") == "started":
                        self.started.setdefault(obj["metadata"]["name"], time.monotonic())
                    if self._stop.is_set():
                        break
            except (ApiException, ProtocolError):
                # An expired or too-new resource version, or a dropped stream: list and watch again.
                continue

    def wait(self, names: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(n in self.started for n in names):
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        self._stop.set()


def machine(namespace: str, name: str, i: int) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Machine", "metadata": {"name": name, "namespace": namespace},
            "spec": {"app": f"app{i % 20}", "region": REGIONS[i % 3], "image": "nginx:1.27"}}




def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def host_loss(cluster: LocalCluster, custom) -> float | None:
    """Seconds from the host's death (stop_host) to its machine's HostReady=False condition."""
    host, region, ns = "bench-lost-host", "lost", "bench-host-loss"
    cluster.add_host(host, region)
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "machines", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Machine", "metadata": {"name": "lonely", "namespace": ns},
        "spec": {"app": "lonely", "region": region, "image": "nginx:1.27"}})

    def machine_status() -> dict:
        return custom.get_namespaced_custom_object(GROUP, VERSION, ns, "machines", "lonely").get("status") or {}

    deadline = time.monotonic() + 180
    while machine_status().get("state") != "started":
        if time.monotonic() > deadline:
            print(f"[bench] host loss: the machine did not start in 180 s: {machine_status()}", file=sys.stderr)
            return None
        time.sleep(0.2)
    lost = time.monotonic()
    cluster.stop_host(host)
    while time.monotonic() - lost < 180:
        conds = {c["type"]: c for c in machine_status().get("conditions") or []}
        if (conds.get("HostReady") or {}).get("status") == "False":
            return round(time.monotonic() - lost, 2)
        time.sleep(0.2)
    return None


def _profile(pid: int) -> subprocess.Popen:
    """py-spy (a bench-time tool: `pip install py-spy`) sampling the operator, written as collapsed stacks."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise SystemExit("--profile needs py-spy in the venv: .venv/bin/pip install py-spy")
    out = RESULTS.with_name("machines-burst.txt")
    return subprocess.Popen([str(spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "50", "--nonblocking",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000, help="machines in the burst")
    ap.add_argument("--steady", type=int, default=300, help="machines in the steady pass")
    ap.add_argument("--rate", type=float, default=20.0, help="creates per second in the steady pass")
    ap.add_argument("--hosts", type=int, default=50, help="simulated hosts beyond kind-config's")
    ap.add_argument("--cluster", default="kubefly-bench-machines")
    ap.add_argument("--keep", action="store_true", help="keep the cluster afterwards")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    ap.add_argument("--phases", default="steady,burst,host-loss",
                    help="comma-separated subset of steady,burst,host-loss")
    ap.add_argument("--profile", action="store_true",
                    help="sample the operator with py-spy during the burst (bench/results/machines-burst.txt)")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    if phases - {"steady", "burst", "host-loss"}:
        ap.error(f"--phases: unknown {sorted(phases - {'steady', 'burst', 'host-loss'})}; use steady, burst, host-loss")
    # SIGTERM runs the cleanup below (operator stopped, cluster deleted) like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from kubernetes import client, config

    cluster = LocalCluster(args.cluster)
    t0 = time.monotonic()
    cluster.up()
    for i in range(args.hosts):
        cluster.apply_host(f"bench-host-{i}", {NODE_REGION: REGIONS[i % 3]})
    cluster.wait_hosts_ready([f"bench-host-{i}" for i in range(args.hosts)], timeout=180)
    helm = [str(TOOLS_BIN / "helm"), "--kubeconfig", str(cluster.kubeconfig)]
    subprocess.run([*helm, "upgrade", "--install", "kubefly", str(REPO / "charts" / "kubefly"), "--namespace",
                    "kubefly-system", "--create-namespace", "--set", "operator.enabled=false", "--wait"],
                   check=True, capture_output=True)
    print(f"[bench] cluster with {len(cluster.topology.hosts) + args.hosts} hosts in {time.monotonic() - t0:.0f}s",
          file=sys.stderr)
    workdir = REPO / "bench" / "results" / f"{args.cluster}-operator"  # per cluster: two benches may run side by side
    workdir.mkdir(parents=True, exist_ok=True)
    sa = cluster.service_account_kubeconfig("kubefly-system", "kubefly", workdir / "kubeconfig")
    op = subprocess.Popen([str(Path(sys.executable).with_name("kubefly")), "operator", "--log-level=WARNING", f"--metrics-port={free_port()}",
                           f"--health-port={free_port()}"],
                          env={**os.environ, "KUBECONFIG": str(sa)}, stdout=(workdir / "operator.log").open("w"),
                          stderr=subprocess.STDOUT)
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    result: dict = {"hosts": len(cluster.topology.hosts) + args.hosts, "cpus": os.cpu_count(),
                    "note": "2 shared cores; other engineers' clusters may run at the same time"}
    try:
        time.sleep(5)  # the operator's startup
        for ns in NAMESPACES:
            core.create_namespace({"metadata": {"name": ns}})
        # Pods are refused until the controller-manager has made the namespace's default ServiceAccount.
        deadline = time.monotonic() + 60
        while not all(core.list_namespaced_service_account(ns).items for ns in NAMESPACES):
            if time.monotonic() > deadline:
                raise SystemExit("the controller-manager made no default ServiceAccount in 60 s")
            time.sleep(0.5)

        # Steady rate.
        if "steady" in phases:
            watcher = Watcher(custom, "bench-steady")
            applied: dict[str, float] = {}
            start = time.monotonic()
            for i in range(args.steady):
                name = f"s-{i}"
                time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
                applied[name] = time.monotonic()
                custom.create_namespaced_custom_object(GROUP, VERSION, "bench-steady", "machines",
                                                       machine("bench-steady", name, i))
            ok = watcher.wait(list(applied), timeout=120)
            watcher.stop()
            lat = [watcher.started[n] - t for n, t in applied.items() if n in watcher.started]
            result.update(steady_machines=args.steady, steady_rate_per_s=args.rate, steady_all_started=ok,
                          p50_apply_to_started_s=round(pct(lat, 50), 3), p99_apply_to_started_s=round(pct(lat, 99), 3))
            print(f"[bench] steady {args.rate}/s x {args.steady}: p50 {result['p50_apply_to_started_s']}s "
                  f"p99 {result['p99_apply_to_started_s']}s", file=sys.stderr)

        # Burst.
        if "burst" in phases:
            watcher = Watcher(custom, "bench-burst")
            names = [f"b-{i}" for i in range(args.count)]
            profiler = _profile(op.pid) if args.profile else None
            result["burst_load_avg_before"] = [round(x, 2) for x in os.getloadavg()]
            cpu_before = cpu_seconds(op.pid)
            start = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda i: custom.create_namespaced_custom_object(
                    GROUP, VERSION, "bench-burst", "machines", machine("bench-burst", names[i], i)), range(args.count)))
            applied_s = time.monotonic() - start
            ok = watcher.wait(names, timeout=300)
            watcher.stop()
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=60)
            result["burst_load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
            # Near the wall time: the operator (one core under the GIL) is the bottleneck.
            result["burst_operator_cpu_s"] = round(cpu_seconds(op.pid) - cpu_before, 1)
            done = max((watcher.started.get(n, float("nan")) for n in names), default=float("nan"))
            all_started = done - start if ok else None
            result.update(burst_machines=args.count, burst_applied_s=round(applied_s, 2),
                          all_started_s=round(all_started, 2) if all_started else None,
                          burst_started=sum(n in watcher.started for n in names),
                          creates_per_s=round(args.count / all_started, 1) if all_started else None)
            print(f"[bench] burst {args.count}: all started in {result['all_started_s']}s "
                  f"({result['burst_started']} started; operator CPU {result['burst_operator_cpu_s']}s; "
                  f"load {result['burst_load_avg_before']} -> {result['burst_load_avg_after']})", file=sys.stderr)
        if "host-loss" in phases:
            result["host_loss_condition_s"] = host_loss(cluster, custom)
            print(f"[bench] host loss -> HostReady=False in {result['host_loss_condition_s']}s", file=sys.stderr)
        result["operator_peak_rss_mb"] = round(peak_rss_mb(op.pid), 1)
    finally:
        op.terminate()
        try:
            op.wait(timeout=60)
        except subprocess.TimeoutExpired:
            print("[bench] the operator did not stop in 60 s after SIGTERM; killed", file=sys.stderr)
            op.kill()
            op.wait()
        if not args.keep:
            cluster.down()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
