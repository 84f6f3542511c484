"""Killing the operator while it creates many machines: no duplicates, everything converges."""

from __future__ import annotations

import json
import time

N = 40
KILLS = 4


def machine(namespace, i):
    return {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine",
            "metadata": {"name": f"m-{i}", "namespace": namespace},
            "spec": {"app": f"app{i % 3}", "region": ["ams", "iad", "syd"][i % 3], "image": "nginx:1.27"}}


def test_kill_and_restart_while_creating_many_machines(kube, namespace, operator):
    docs = {"apiVersion": "v1", "kind": "List", "items": [machine(namespace, i) for i in range(N)]}
    kube.kubectl("apply", "-f", "-", input=json.dumps(docs))
    for _ in range(KILLS):
        time.sleep(1.5)  # let it get part of the way
        operator.kill()
        operator.start()

    def converged():
        items = json.loads(kube.kubectl("-n", namespace, "get", "machines", "-o", "json").stdout)["items"]
        started = [m for m in items if (m.get("status") or {}).get("state") == "started"]
        return len(started) == N and items
    items = kube.wait_for(f"all {N} machines started after {KILLS} operator kills", converged, timeout=180)
    pods = json.loads(kube.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout)["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == sorted(f"m-{i}" for i in range(N))  # one pod each
    for m in items:
        st = m["status"]
        pod = next(p for p in pods if p["metadata"]["name"] == m["metadata"]["name"])
        assert pod["spec"]["nodeName"] == st["host"]
        assert pod["metadata"]["annotations"]["kubefly.dev/instance-id"] == st["instanceId"]
        assert st["version"] == 1  # a re-run never made a second version of an unchanged machine
        assert [e["type"] for e in st["events"]].count("launch") == 1
