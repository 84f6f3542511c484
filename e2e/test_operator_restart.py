"""Killing the operator (SIGKILL, several times) while it creates many machines, and
machines with their volumes: no duplicate pods, PVs or PVCs; everything converges."""

from __future__ import annotations

import json
import time

N = 40
KILLS = 4
NV = 12  # volumes, each with one machine mounting it


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


def volume(namespace, i):
    return {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Volume",
            "metadata": {"name": f"data-{i}", "namespace": namespace},
            "spec": {"app": f"db{i % 4}", "region": ["ams", "iad", "syd"][i % 3], "sizeGb": 1}}


def volume_machine(namespace, i):
    return {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine",
            "metadata": {"name": f"db-{i}", "namespace": namespace},
            "spec": {"app": f"db{i % 4}", "region": ["ams", "iad", "syd"][i % 3], "image": "postgres:15",
                     "mounts": [{"volume": f"data-{i}", "path": "/data"}]}}


def test_kill_and_restart_while_creating_machines_with_volumes(kube, namespace, operator):
    # Volumes and their machines in one apply: the machines wait for their volumes,
    # so kills land in volume placement, PV/PVC creation, the claim and the pod create.
    items = [volume(namespace, i) for i in range(NV)] + [volume_machine(namespace, i) for i in range(NV)]
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    for _ in range(KILLS):
        time.sleep(1.5)
        operator.kill()
        operator.start()

    def converged():
        ms = json.loads(kube.kubectl("-n", namespace, "get", "machines", "-o", "json").stdout)["items"]
        return ms if sum((m.get("status") or {}).get("state") == "started" for m in ms) == NV else None
    machines = kube.wait_for(f"all {NV} volume machines started after {KILLS} operator kills", converged, timeout=240)
    vols = {v["metadata"]["name"]: v for v in json.loads(kube.kubectl("-n", namespace, "get", "volumes", "-o", "json").stdout)["items"]}
    pvs = json.loads(kube.kubectl("get", "pv", "-l", f"kubefly.dev/namespace={namespace}", "-o", "json").stdout)["items"]
    pvcs = json.loads(kube.kubectl("-n", namespace, "get", "pvc", "-o", "json").stdout)["items"]
    pods = json.loads(kube.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout)["items"]
    # Exactly one of each: no duplicates made by a re-run after a kill.
    assert sorted(p["metadata"]["labels"]["kubefly.dev/volume"] for p in pvs) == sorted(f"data-{i}" for i in range(NV))
    assert sorted(p["metadata"]["name"] for p in pvcs) == sorted(f"vol-data-{i}" for i in range(NV))
    assert sorted(p["metadata"]["name"] for p in pods) == sorted(f"db-{i}" for i in range(NV))
    for m in machines:
        name, st = m["metadata"]["name"], m["status"]
        vol = vols[name.replace("db-", "data-")]["status"]
        pod = next(p for p in pods if p["metadata"]["name"] == name)
        assert st["host"] == vol["host"] == pod["spec"]["nodeName"]  # on its volume's host
        assert vol["attachedMachine"] == name
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [vol["claim"]]
        assert st["version"] == 1 and [e["type"] for e in st["events"]].count("launch") == 1
