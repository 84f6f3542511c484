from __future__ import annotations

import json

import pytest

from kubefly import labels
from kubefly.gossip.checks import CheckSpec
from kubefly.gossip.client import LocalReplica
from kubefly.gossip.sources import DirSource, pod_state, pod_to_machine


def pod(phase="Running", ready="True", deleting=False, **meta_over):
    p = {
        "metadata": {
            "name": "web-abc", "namespace": "acme", "uid": "u-1",
            "labels": {labels.APP: "web", labels.MACHINE: "m1", labels.REGION: "ams"},
            "annotations": {
                labels.INSTANCE_ID: "inst-7",
                labels.SERVICES: json.dumps([{"internal_port": 8080, "ports": [80, 443], "hard_limit": 25}]),
                labels.CHECKS: json.dumps([{"name": "alive", "type": "http", "port": 8080, "path": "/health",
                                            "intervalSeconds": 5, "gracePeriodSeconds": 2}]),
            },
        },
        "spec": {"nodeName": "node-1"},
        "status": {"phase": phase, "podIP": "10.1.2.3",
                   "conditions": [{"type": "ContainersReady", "status": ready}]},
    }
    if deleting:
        p["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    p["metadata"].update(meta_over)
    return p


def test_pod_to_machine():
    m = pod_to_machine(pod(), "default-region")
    assert (m.org, m.app, m.machine_id, m.instance_id, m.region, m.address, m.state) == (
        "acme", "web", "m1", "inst-7", "ams", "10.1.2.3", "started")
    assert m.services[0]["ports"] == [80, 443] and m.services[0]["hard_limit"] == 25
    assert m.checks == (CheckSpec(name="alive", type="http", port=8080, path="/health", interval=5.0, grace=2.0),)


@pytest.mark.parametrize("kw,state", [
    ({}, "started"),
    ({"ready": "False"}, "starting"),
    ({"phase": "Pending"}, "starting"),
    ({"phase": "Succeeded"}, "stopped"),
    ({"phase": "Failed"}, "failed"),
    ({"deleting": True}, "stopping"),
])
def test_pod_state(kw, state):
    assert pod_state(pod(**kw)) == state


def test_non_machine_pods_are_ignored_and_bad_ones_raise():
    p = pod()
    p["metadata"]["labels"] = {}
    assert pod_to_machine(p, "r") is None
    p = pod()
    p["metadata"]["annotations"][labels.SERVICES] = json.dumps([{"internal_port": 0}])
    with pytest.raises(ValueError):
        pod_to_machine(p, "r")


def test_dir_source_scan(tmp_path):
    got = []
    src = DirSource(tmp_path, "node-1", "ams", got.append)
    (tmp_path / "a.json").write_text(json.dumps({"org": "acme", "app": "web", "machine_id": "a"}))
    (tmp_path / "p.json").write_text(json.dumps({"kind": "Pod", **pod()}))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "foreign.json").write_text(json.dumps({"org": "acme", "app": "web", "machine_id": "f", "host": "node-2"}))
    assert src.scan()
    assert set(src.machines()) == {("acme", "a"), ("acme", "m1")}
    assert src.machines()[("acme", "a")].region == "ams"
    assert not src.scan()  # nothing changed
    (tmp_path / "a.json").unlink()
    assert src.scan() and set(src.machines()) == {("acme", "m1")}


def inst(mid, app="web", **over):
    d = {"org": "acme", "app": app, "machine_id": mid, "instance_id": mid, "region": "r0", "host": "h1",
         "address": "10.0.0.1", "state": "started", "check_status": "passing"}
    d.update(over)
    return d


async def test_local_replica_applies_the_watch_stream():
    r = LocalReplica()
    q = r.subscribe()
    r.apply_line({"type": "snapshot", "self": {"host": "h1", "region": "r0"}, "instances": [inst("a")], "rtt": {"h2": 0.01}})
    r.apply_line({"type": "upsert", "instance": inst("b", app="api")})
    r.apply_line({"type": "upsert", "instance": inst("a", app="moved")})
    r.apply_line({"type": "rtt", "rtt": {"h3": 0.02}})
    assert r.self_host == "h1" and r.rtt("h1") == 0.0 and r.rtt("h3") == 0.02 and r.rtt("h9") is None
    assert r.apps() == {("acme", "api"), ("acme", "moved")}
    r.apply_line({"type": "delete", "org": "acme", "machine_id": "b"})
    assert [i.machine_id for i in r.instances()] == ["a"] and r.instances("acme", "api") == []
    kinds = [q.get_nowait().kind for _ in range(q.qsize())]
    assert kinds == ["snapshot", "upsert", "upsert", "rtt", "delete"]
    assert await r.wait_for(lambda rep: len(rep.instances()) == 1, 0.1)
    assert not await r.wait_for(lambda rep: len(rep.instances()) == 5, 0.1)
