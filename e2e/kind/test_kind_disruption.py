"""Disruptive cases, run last on the shared cluster (conftest orders them):
a worker's container stopped and started again (host loss and recovery), and
the operator's pod killed while it creates 50 Machines."""

from __future__ import annotations

import json
import subprocess
import threading
import time

from .kindlib import RELEASE_NAMESPACE, KindCluster
from .test_kind_appsecrets import cond, settled
from .test_kind_cluster import guard_rules, service_cidr
from .test_kind_machines import machine

HOST_LOSS_WITHIN_S = 60  # the Machines issue: host loss shows in a condition within 60 s


def get_machine(kind: KindCluster, namespace: str, name: str) -> dict:
    return json.loads(kind.kubectl("-n", namespace, "get", "machine", name, "-o", "json").stdout)


def region_away_from_the_operator(kind: KindCluster) -> str:
    """A worker region whose host does not run the operator. Losing the operator's own host is another
    case (the operator's pod only leaves a lost node after the 300 s eviction; see docs/kind.md)."""
    nodes = json.loads(kind.kubectl("get", "nodes", "-l", "!node-role.kubernetes.io/control-plane", "-o", "json").stdout)["items"]
    operator = kind.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator",
                            "--field-selector=status.phase=Running", "-o", "jsonpath={.items[*].spec.nodeName}").stdout.split()
    return sorted(n["metadata"]["labels"]["topology.kubernetes.io/region"] for n in nodes if n["metadata"]["name"] not in operator)[0]


def test_a_stopped_worker_is_reported_as_host_loss_and_its_machine_recovers_when_it_starts(kind: KindCluster, namespace: str):
    kind.apply(machine(kind, "lost-1", region_away_from_the_operator(kind)), namespace)
    m = kind.wait_for("lost-1 started", lambda: settled(m := get_machine(kind, namespace, "lost-1")) and m, timeout=180)
    host = m["status"]["host"]
    instance = m["status"]["instanceId"]

    subprocess.run(["docker", "stop", host], check=True, capture_output=True)
    stopped = time.monotonic()
    try:
        m = kind.wait_for(f"HostNotReady on lost-1 within {HOST_LOSS_WITHIN_S}s of `docker stop {host}`",
                          lambda: (cond(m := get_machine(kind, namespace, "lost-1"), "HostReady") or {})
                          .get("reason") == "HostNotReady" and m, timeout=HOST_LOSS_WITHIN_S)
        print(f"[kind] HostNotReady {time.monotonic() - stopped:.0f}s after `docker stop {host}` returned")
        assert "comes back when the host does" in cond(m, "HostReady")["message"]
        assert cond(m, "Ready")["status"] == "False" and m["status"]["host"] == host
    finally:
        subprocess.run(["docker", "start", host], check=True, capture_output=True)

    m = kind.wait_for("lost-1 back on its host", lambda: settled(m := get_machine(kind, namespace, "lost-1"))
                      and (cond(m, "HostReady") or {}).get("status") == "True" and m, timeout=240)
    assert m["status"]["host"] == host and m["status"]["instanceId"] == instance
    pod = json.loads(kind.kubectl("-n", namespace, "get", "pod", "lost-1", "-o", "json").stdout)
    assert pod["spec"]["nodeName"] == host
    # The node booted again: its Service CIDR guard is back (the systemd unit), not only applied once.
    cidr = service_cidr(kind)
    assert guard_rules(host, cidr) == [f"32000: from all to {cidr} iif lo lookup main", f"32001: from all to {cidr} unreachable"]


def pause_image(kind: KindCluster) -> str:
    """The pause image preloaded in every node: a Machine that starts at once and costs nothing."""
    node = kind.kubectl("get", "nodes", "-l", "!node-role.kubernetes.io/control-plane", "-o", "jsonpath={.items[0].metadata.name}").stdout
    images = subprocess.run(["docker", "exec", node, "ctr", "-n", "k8s.io", "images", "ls", "-q"],
                            capture_output=True, text=True, check=True).stdout.split()
    return sorted(i for i in images if "/pause:" in i)[-1]


def test_operator_killed_while_creating_50_machines_creates_each_pod_once_and_all_converge(kind: KindCluster, namespace: str):
    count, regions = 50, ["ams", "iad", "syd"]
    image = pause_image(kind)
    specs = []
    for i in range(count):
        spec = machine(kind, f"burst-{i:02d}", regions[i % len(regions)])
        spec["spec"].update(app="burst", image=image, services=[], guest={"cpuKind": "shared", "cpus": 1, "memoryMb": 256})
        specs.append(spec)

    # Every pod UID each Machine ever had: one each, or the operator created a pod twice.
    seen: dict[str, set[str]] = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            out = kind.kubectl("-n", namespace, "get", "pods", "-o", "jsonpath={range .items[*]}{.metadata.name} {.metadata.uid}{\"\\n\"}{end}",
                               check=False).stdout
            for line in out.splitlines():
                name, uid = line.split()
                seen.setdefault(name, set()).add(uid)
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        operator = kind.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator",
                                "-o", "jsonpath={.items[0].metadata.name}").stdout
        kind.apply(specs, namespace)
        created = kind.wait_for("the operator to be creating pods", lambda: len(seen) >= 3 and len(seen), interval=0.2, timeout=120)
        kind.kubectl("-n", RELEASE_NAMESPACE, "delete", "pod", operator, "--grace-period=0", "--force")
        assert created < count, "the operator was killed after it had created every pod: nothing was tested"

        def converged():
            ms = json.loads(kind.kubectl("-n", namespace, "get", "machines", "-o", "json").stdout)["items"]
            done = [m for m in ms if settled(m)]
            return len(done) == count and ms
        ms = kind.wait_for(f"all {count} Machines started after the operator's restart", converged, timeout=420, interval=3)
    finally:
        stop.set()
        watcher.join()
    new = kind.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator",
                       "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    assert new and operator not in new
    pods = json.loads(kind.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout)["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == sorted(s["metadata"]["name"] for s in specs)
    twice = {name: uids for name, uids in seen.items() if len(uids) > 1}
    assert not twice, f"machines whose pod was created more than once: {sorted(twice)}"
    for m in ms:
        pod = next(p for p in pods if p["metadata"]["name"] == m["metadata"]["name"])
        assert m["status"]["version"] == 1 and pod["metadata"]["annotations"]["kubefly.dev/instance-id"] == m["status"]["instanceId"]
