"""A Volume mounted by a Machine on kind: the data is a directory on the pinned
worker's disk, and it outlives stop/start and a replace."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from .kindlib import KindCluster
from .test_kind_machines import machine


def get(kind: KindCluster, namespace: str, kind_: str, name: str) -> dict | None:
    proc = kind.kubectl("-n", namespace, "get", kind_, name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def started(kind: KindCluster, namespace: str, name: str, version: int):
    """The Machine once it is started at `version` and its pod is Ready; else None."""
    m = get(kind, namespace, "machine", name)
    st = (m or {}).get("status") or {}
    if st.get("state") != "started" or st.get("version") != version:
        return None
    pod = get(kind, namespace, "pod", name)
    ready = pod and any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
    return m if ready and pod["metadata"]["annotations"].get("kubefly.dev/instance-id") == st.get("instanceId") else None


def mount_failure(kind: KindCluster, namespace: str, pod: str) -> str | None:
    """The kubelet's FailedMount message for `pod`, if any (it retries for minutes; the cause is known at once)."""
    out = kind.kubectl("-n", namespace, "get", "events", "--field-selector",
                       f"involvedObject.name={pod},reason=FailedMount", "-o", "jsonpath={.items[*].message}").stdout
    return out or None


def started_or_mount_failure(kind: KindCluster, namespace: str, name: str, version: int):
    failure = mount_failure(kind, namespace, name)
    if failure and "does not exist" in failure:  # not a transient one (e.g. a cache not synced yet)
        pytest.fail(f"{name}'s volume cannot be mounted: {failure}", pytrace=False)
    return started(kind, namespace, name, version)


def in_machine(kind: KindCluster, namespace: str, name: str, code: str) -> str:
    return kind.kubectl("-n", namespace, "exec", name, "-c", "machine", "--", "/opt/kubefly/bin/python", "-c", code).stdout.strip()


# The test app runs as a non-root user (65532), as most images do: the volume must be its to write.
def test_volume_data_outlives_stop_start_and_a_replace_on_the_pinned_workers_disk(kind: KindCluster, namespace: str):
    kind.apply({"apiVersion": "kubefly.dev/v1alpha1", "kind": "Volume", "metadata": {"name": "data"},
                "spec": {"app": "vol", "region": "syd", "sizeGb": 1}}, namespace)
    spec = machine(kind, "vol-1", "syd")
    spec["spec"]["app"] = "vol"
    spec["spec"]["mounts"] = [{"volume": "data", "path": "/data"}]
    kind.apply(spec, namespace)
    m = kind.wait_for("vol-1 started with its volume", lambda: started_or_mount_failure(kind, namespace, "vol-1", 1), timeout=180)
    host = m["status"]["host"]
    vol = get(kind, namespace, "volume", "data")
    assert vol["status"]["host"] == host and vol["status"].get("attachedMachine") == "vol-1"

    token = uuid.uuid4().hex
    in_machine(kind, namespace, "vol-1", f"open('/data/marker', 'w').write({token!r})")
    read = "print(open('/data/marker').read())"
    # The bytes are on the pinned worker's own disk, where the PV says.
    pv = json.loads(kind.kubectl("get", "pv", vol["status"]["persistentVolume"], "-o", "json").stdout)["spec"]
    path = pv["hostPath"]["path"]
    on_disk = subprocess.run(["docker", "exec", host, "cat", f"{path}/marker"], capture_output=True, text=True)
    assert on_disk.stdout == token, on_disk.stderr

    # Stop, start: the same host, the same data.
    kind.kubectl("-n", namespace, "patch", "machine", "vol-1", "--type=merge", "-p", '{"spec":{"state":"stopped"}}')
    kind.wait_for("vol-1 stopped and its pod gone", lambda: (get(kind, namespace, "machine", "vol-1")["status"].get("state") == "stopped"
                                                          and get(kind, namespace, "pod", "vol-1") is None), timeout=120)
    kind.kubectl("-n", namespace, "patch", "machine", "vol-1", "--type=merge", "-p", '{"spec":{"state":"started"}}')
    m = kind.wait_for("vol-1 started again", lambda: started(kind, namespace, "vol-1", 1), timeout=180)
    assert m["status"]["host"] == host
    assert in_machine(kind, namespace, "vol-1", read) == token

    # A spec change replaces the pod (a new version) on the same host, the data with it.
    kind.kubectl("-n", namespace, "patch", "machine", "vol-1", "--type=merge", "-p", '{"spec":{"env":{"GENERATION":"2"}}}')
    m = kind.wait_for("vol-1 replaced by version 2", lambda: started(kind, namespace, "vol-1", 2), timeout=180)
    assert m["status"]["host"] == host
    assert in_machine(kind, namespace, "vol-1", "import os; print(os.environ['GENERATION'])") == "2"
    assert in_machine(kind, namespace, "vol-1", read) == token


def volume_events(kind: KindCluster, namespace: str, name: str, reason: str) -> list[dict]:
    out = kind.kubectl("-n", namespace, "get", "events", "--field-selector",
                       f"involvedObject.kind=Volume,involvedObject.name={name},reason={reason}", "-o", "json").stdout
    return json.loads(out)["items"]


# The leak: a re-created Volume (another app, or a re-created namespace) mounted the old data.
def test_a_deleted_volumes_data_is_wiped_from_its_host_and_a_new_volume_of_that_name_starts_empty(kind: KindCluster, namespace: str):
    volume = {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Volume", "metadata": {"name": "data"},
              "spec": {"app": "leak", "region": "syd", "sizeGb": 1}}

    def with_volume(name: str) -> dict:
        spec = machine(kind, name, "syd")
        spec["spec"]["app"] = "leak"
        spec["spec"]["mounts"] = [{"volume": "data", "path": "/data"}]
        return spec

    kind.apply(volume, namespace)
    kind.apply(with_volume("leak-1"), namespace)
    m = kind.wait_for("leak-1 started with its volume", lambda: started_or_mount_failure(kind, namespace, "leak-1", 1), timeout=180)
    host = m["status"]["host"]
    first = get(kind, namespace, "volume", "data")
    path = first["status"]["path"]
    assert path.endswith(f"/data.{first['metadata']['uid']}"), path
    token = uuid.uuid4().hex
    in_machine(kind, namespace, "leak-1", f"import os; os.makedirs('/data/db'); open('/data/db/secret', 'w').write({token!r})")
    on_disk = subprocess.run(["docker", "exec", host, "cat", f"{path}/db/secret"], capture_output=True, text=True)
    assert on_disk.stdout == token, on_disk.stderr

    kind.kubectl("-n", namespace, "delete", "machine", "leak-1", "--wait=true", "--timeout=120s", timeout=150)
    kind.kubectl("-n", namespace, "delete", "volume", "data", "--wait=true", "--timeout=120s", timeout=150)
    # Gone from the worker's disk, not just from the API.
    parent, leaf = path.rsplit("/", 1)
    listing = subprocess.run(["docker", "exec", host, "ls", "-A", parent], capture_output=True, text=True)
    assert listing.returncode == 0 and leaf not in listing.stdout.split(), listing.stdout + listing.stderr
    assert volume_events(kind, namespace, "data", "DataWiped"), "no DataWiped event"
    assert not volume_events(kind, namespace, "data", "DataLeftOnHost")
    wipe_pods = json.loads(kind.kubectl("get", "pods", "-A", "-l", "kubefly.dev/role=volume-wipe", "-o", "json").stdout)["items"]
    assert [p["metadata"]["name"] for p in wipe_pods if p["metadata"]["annotations"].get("kubefly.dev/path") == path] == []

    kind.apply(volume, namespace)
    kind.apply(with_volume("leak-2"), namespace)
    m = kind.wait_for("leak-2 started with the new volume", lambda: started_or_mount_failure(kind, namespace, "leak-2", 1), timeout=180)
    second = get(kind, namespace, "volume", "data")
    assert m["status"]["host"] == host, "syd has one host: the new volume is on the same disk"
    assert second["status"]["path"] != path
    assert in_machine(kind, namespace, "leak-2", "import os; print(sorted(os.listdir('/data')))") == "[]"
