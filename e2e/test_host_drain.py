"""`kubefly host drain` on the real control plane, as a platform operator runs it.

The CLI runs as a user would run it (the kubeconfig, no operator internals);
the operator moves the Machines. kwok hosts start pods by themselves, so the
case checks placement, the one-at-a-time order, status and the host's
annotation; traffic through the proxy during a drain is the kind case's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kubefly import labels

pytestmark = pytest.mark.usefixtures("operator")
KUBEFLY = Path(sys.executable).parent / "kubefly"
API = "kubefly.dev/v1alpha1"


def apply(kube, manifest: dict) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def machine(namespace, name, app, region, **spec) -> dict:
    return {"apiVersion": API, "kind": "Machine", "metadata": {"name": name, "namespace": namespace},
            "spec": {"app": app, "region": region, "image": "nginx:1.27", **spec}}


def ready(kube, namespace, name):
    m = kube.get(namespace, "machine", name)
    status = (m or {}).get("status") or {}
    if status.get("state") == "failed":
        pytest.fail(f"machine {name} failed: {status.get('conditions')}")
    ok = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
    return m if ok and status.get("state") == "started" else None


def host(kube, name) -> dict:
    return json.loads(kube.kubectl("get", "node", name, "-o", "json").stdout)


def cli(kube, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(KUBEFLY), *args], capture_output=True, text=True, timeout=180, check=check,
                          env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)})


def drain(kube, name: str, deadline: str) -> subprocess.CompletedProcess:
    return cli(kube, "host", "drain", name, "--deadline", deadline, check=False)


@pytest.fixture
def region(kube):
    name = f"d{uuid.uuid4().hex[:6]}"
    yield name
    for suffix in ("h1", "h2"):
        kube.kubectl("delete", "node", f"{name}-{suffix}", "--ignore-not-found", "--wait=false")


def test_drain_moves_every_stateless_machine_off_the_host_one_per_app_and_records_it(kube, namespace, region):
    h1, h2 = f"{region}-h1", f"{region}-h2"
    kube.cluster.add_host(h1, region)
    kube.cluster.add_host(h2, region)
    # Cordoned, h2 takes no new machine: they all start on h1.
    cli(kube, "host", "cordon", h2)
    assert host(kube, h2)["spec"].get("unschedulable") is True
    for name, app in (("web-1", "web"), ("web-2", "web"), ("solo", "solo")):
        apply(kube, machine(namespace, name, app, region))
    before = {n: kube.wait_for(f"{n} started on {h1}", lambda n=n: ready(kube, namespace, n), timeout=60)
              for n in ("web-1", "web-2", "solo")}
    assert {m["status"]["host"] for m in before.values()} == {h1}
    cli(kube, "host", "uncordon", h2)

    out = drain(kube, h1, "90s")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"host {h1} drained" in out.stdout and "3 machine(s) moved" in out.stdout
    # web-2 waited for web-1 (or the other way round): the app always had a routable machine.
    assert re.search(r"web-\d: waiting: app web moves one machine at a time", out.stdout), out.stdout
    for name, was in before.items():
        m = ready(kube, namespace, name)
        assert m and m["status"]["host"] == h2, (name, m and m["status"])
        assert m["status"]["instanceId"] != was["status"]["instanceId"] and m["status"]["version"] == 2
        log = [(e["type"], e["status"]) for e in m["status"]["events"]]
        assert ("move", "requested") in log and ("move", "moved") in log, log
        assert labels.MOVE_FROM not in (m["metadata"].get("annotations") or {}), "the request is cleared once done"
        assert kube.get(namespace, "pod", name)["spec"]["nodeName"] == h2
    node = host(kube, h1)
    assert node["spec"].get("unschedulable") is True
    state = json.loads(node["metadata"]["annotations"][labels.DRAIN])
    assert state["state"] == "drained" and state["moved"] == 3 and state["machinesLeft"] == 0

    # Cordoned, it takes nothing new; uncordoned, it does again.
    apply(kube, machine(namespace, "late", "late", region))
    assert kube.wait_for("late started", lambda: ready(kube, namespace, "late"), timeout=60)["status"]["host"] == h2
    cli(kube, "host", "uncordon", h1)
    node = host(kube, h1)
    assert not node["spec"].get("unschedulable") and labels.DRAIN not in (node["metadata"].get("annotations") or {})


def test_a_machine_that_cannot_move_says_why_at_once_and_the_drain_ends_at_its_deadline(kube, namespace, region):
    h1, h2 = f"{region}-h1", f"{region}-h2"
    kube.cluster.add_host(h1, region, volume_capacity_gb=10)
    apply(kube, {"apiVersion": API, "kind": "Volume", "metadata": {"name": "data", "namespace": namespace},
                 "spec": {"app": "db", "region": region, "sizeGb": 1}})
    apply(kube, machine(namespace, "db-1", "db", region, mounts=[{"volume": "data", "path": "/data"}]))
    kube.wait_for("db-1 started", lambda: ready(kube, namespace, "db-1"), timeout=90)
    kube.cluster.add_host(h2, region)

    out = drain(kube, h1, "6s")
    assert out.returncode == 1, out.stdout + out.stderr
    line = next(ln for ln in out.stdout.splitlines() if f"{namespace}/db-1: blocked" in ln)
    assert float(line.split("s]")[0].strip("[ ")) < 5, "said within the first round"
    # Its volume cannot migrate: this tier has no object store for the copies (and h2 no disk for it).
    assert "volume data" in line and "cannot migrate" in line and "objectStore" in line
    assert "not drained after 6s" in out.stderr and "db-1" in out.stderr
    state = json.loads(host(kube, h1)["metadata"]["annotations"][labels.DRAIN])
    assert state["state"] == "timed-out" and state["blocked"] and "db-1" in state["blocked"][0]
    # Nothing was touched: the machine runs on, with its volume, and nothing is asked of either any more.
    m = ready(kube, namespace, "db-1")
    assert m and m["status"]["host"] == h1 and m["status"]["version"] == 1
    assert labels.MOVE_FROM not in (m["metadata"].get("annotations") or {})
    assert kube.wait_for("the volume's migration request withdrawn", lambda: labels.MIGRATE_FROM not in (
        (kube.get(namespace, "volume", "data") or {"metadata": {}})["metadata"].get("annotations") or {}), timeout=30)
