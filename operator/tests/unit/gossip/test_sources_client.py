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


def machine_obj(name="m1", *, host="node-1", desired="stopped", state="created", **status_over):
    status = {"state": state, "host": host, "region": "ams", "instanceId": "inst-9", **status_over}
    return {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine",
            "metadata": {"name": name, "namespace": "acme", "uid": "u-9", "generation": 3},
            "spec": {"app": "web", "region": "ams", "image": "x", "state": desired,
                     "services": [{"internalPort": 8080, "ports": [{"port": 80}], "autostop": "stop",
                                   "minMachinesRunning": 1}],
                     "checks": [{"name": "alive", "type": "tcp", "port": 8080}]},
            "status": status}


def test_a_machine_without_a_pod_is_a_row_that_is_never_routable():
    from kubefly.gossip.sources import machine_to_local

    m = machine_to_local(machine_obj(), "node-1", "r")
    assert (m.org, m.app, m.machine_id, m.instance_id, m.region, m.address, m.state) == (
        "acme", "web", "m1", "inst-9", "ams", "", "created")
    svc = m.services[0]
    assert (svc["internal_port"], svc["ports"], svc["autostart"], svc["autostop"], svc["min_machines_running"]) == (
        8080, [80], True, "stop", 1)
    assert m.checks[0].name == "alive"
    # Placed on another host, or not placed yet: not this agent's row.
    assert machine_to_local(machine_obj(host="node-2"), "node-1", "r") is None
    assert machine_to_local(machine_obj(host=None), "node-1", "r") is None


@pytest.mark.parametrize("desired,status,extra,state", [
    ("stopped", None, {}, "created"),  # applied stopped: placed, never booted
    ("stopped", "created", {}, "created"),
    ("stopped", "stopped", {}, "stopped"),
    ("stopped", "stopping", {}, "stopped"),  # the pod is gone already
    ("stopped", "started", {}, "stopped"),  # autostop asked, the status lags
    ("started", "stopped", {}, "starting"),  # started again, the pod not there yet
    ("started", "created", {}, "starting"),
    ("started", "failed", {}, "failed"),  # e.g. no capacity: nothing to autostart
    ("started", "stopped", {"conditions": [{"type": "Ready", "status": "False", "reason": "Exited",
                                            "observedGeneration": 3}]}, "failed"),
    ("started", "stopped", {"conditions": [{"type": "Ready", "status": "False", "reason": "Exited",
                                            "observedGeneration": 2}]}, "starting"),  # spec changed since
])
def test_machine_state(desired, status, extra, state):
    from kubefly.gossip.sources import machine_state

    assert machine_state(machine_obj(desired=desired, state=status, **extra)) == state


def test_machines_going_away_have_no_row():
    from kubefly.gossip.sources import machine_state

    gone = machine_obj()
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert machine_state(gone) is None
    assert machine_state(machine_obj(state="destroying")) is None


def test_merge_the_pod_wins_over_its_machine_and_bad_objects_are_skipped():
    from kubefly.gossip.sources import merge

    running = pod()
    running["metadata"]["labels"][labels.MACHINE] = "m1"
    bad = machine_obj("m3")
    bad["spec"]["services"] = [{"ports": []}]  # no internalPort
    out = merge([running], [machine_obj("m1", desired="started", state="started"), machine_obj("m2"), bad,
                            machine_obj("m4", host="node-2")], "node-1", "r")
    assert set(out) == {("acme", "m1"), ("acme", "m2")}
    assert out[("acme", "m1")].state == "started" and out[("acme", "m1")].address == "10.1.2.3"
    assert out[("acme", "m2")].state == "created" and out[("acme", "m2")].address == ""


def test_dir_source_reads_machines_and_their_pods(tmp_path):
    src = DirSource(tmp_path, "node-1", "ams", lambda _: None)
    (tmp_path / "m1.json").write_text(json.dumps(machine_obj("m1")))
    assert src.scan() and src.machines()[("acme", "m1")].state == "created"
    p = pod()
    p["metadata"]["labels"][labels.MACHINE] = "m1"
    (tmp_path / "m1-pod.json").write_text(json.dumps({"kind": "Pod", **p}))
    assert src.scan() and src.machines()[("acme", "m1")].state == "started"
    (tmp_path / "m1-pod.json").unlink()
    assert src.scan() and src.machines()[("acme", "m1")].state == "created"
