"""Volumes on the real control plane: placement, the pinned PV and its claim, growth,
the lone-volume warning, deletion held while attached, the wipe of a deleted
Volume's directory, and an operator restart.

A Volume's attachment is written by the Machine controller; where a test needs
an attached Volume without depending on mounting, it writes `attachedMachine`
itself, exactly as that controller does (a status patch with a resourceVersion).
kwok runs no containers: where the wipe pod's script must have finished, the
test writes the pod's phase as the kubelet would.
"""

from __future__ import annotations

import json
import uuid

import pytest

pytestmark = pytest.mark.usefixtures("operator")


def apply_volume(kube, namespace, name, **spec):
    spec = {"app": "web", "region": "ams", "sizeGb": 1, **spec}
    manifest = {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Volume",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def get(kube, *args):
    proc = kube.kubectl(*args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def cond(obj, type_):
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def wait_volume(kube, namespace, name, what, pred, timeout=60):
    def probe():
        v = get(kube, "-n", namespace, "get", "volume", name)
        return v if v and pred(v) else None
    return kube.wait_for(f"volume {name}: {what}", probe, timeout=timeout)


def is_ready(v):
    c = cond(v, "Ready")
    return c and c["status"] == "True"


def cond_is(type_, status, reason=None):
    def pred(v):
        c = cond(v, type_)
        return c and c["status"] == status and (reason is None or c["reason"] == reason)
    return pred


def attach(kube, namespace, volume, machine):
    v = get(kube, "-n", namespace, "get", "volume", volume)
    patch = {"metadata": {"resourceVersion": v["metadata"]["resourceVersion"]}, "status": {"attachedMachine": machine}}
    kube.kubectl("-n", namespace, "patch", "volume", volume, "--subresource=status", "--type=merge", "-p", json.dumps(patch))


@pytest.fixture
def region(kube):
    """A region of its own with two small hosts, so placement sees only this test's volumes."""
    name = f"v{uuid.uuid4().hex[:6]}"
    hosts = [f"{name}-h1", f"{name}-h2"]
    for host in hosts:
        kube.cluster.add_host(host, name, volume_capacity_gb=10)
    yield name, hosts
    for host in hosts:
        kube.cluster.delete_host(host)


def test_volume_becomes_a_pv_pinned_to_its_host_and_a_bound_claim(kube, namespace):
    apply_volume(kube, namespace, "data", region="iad", sizeGb=3)
    v = wait_volume(kube, namespace, "data", "Ready", is_ready)
    st = v["status"]
    assert st["host"] == "kubefly-worker2"  # the one iad host of kind-config.yaml
    assert st["claim"] == "vol-data"
    pv = get(kube, "get", "pv", st["persistentVolume"])
    assert pv["spec"]["storageClassName"] == "kubefly-local"
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert pv["spec"]["capacity"]["storage"] == "3Gi"
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["kubefly-worker2"]}]}]
    pvc = get(kube, "-n", namespace, "get", "pvc", "vol-data")
    assert pvc["status"]["phase"] == "Bound" and pvc["spec"]["volumeName"] == st["persistentVolume"]
    assert pvc["metadata"]["ownerReferences"][0]["kind"] == "Volume"
    table = kube.kubectl("-n", namespace, "get", "volumes").stdout
    assert "HOST" in table and "kubefly-worker2" in table.splitlines()[1]


def test_a_lone_volume_is_warned_about_until_a_sibling_joins_and_again_when_it_leaves(kube, namespace):
    apply_volume(kube, namespace, "a", region="iad")
    v = wait_volume(kube, namespace, "a", "Redundant=False", cond_is("Redundant", "False", "SingleVolumeInRegion"))
    assert "run at least two" in cond(v, "Redundant")["message"]
    apply_volume(kube, namespace, "other-app", app="api", region="iad")
    apply_volume(kube, namespace, "other-region", region="syd")
    wait_volume(kube, namespace, "other-region", "Ready", is_ready)
    assert cond(get(kube, "-n", namespace, "get", "volume", "a"), "Redundant")["status"] == "False"
    apply_volume(kube, namespace, "b", region="iad")
    wait_volume(kube, namespace, "a", "Redundant=True", cond_is("Redundant", "True", "MultipleVolumesInRegion"))
    wait_volume(kube, namespace, "b", "Redundant=True", cond_is("Redundant", "True"))
    kube.kubectl("-n", namespace, "delete", "volume", "b", "--wait=true", "--timeout=60s")
    wait_volume(kube, namespace, "a", "Redundant=False again", cond_is("Redundant", "False", "SingleVolumeInRegion"))


def test_volumes_spread_across_hosts_fit_capacity_and_grow_in_place(kube, namespace, region):
    name, hosts = region
    apply_volume(kube, namespace, "v1", region=name, sizeGb=6)
    apply_volume(kube, namespace, "v2", region=name, sizeGb=6)
    v1 = wait_volume(kube, namespace, "v1", "Ready", is_ready)
    v2 = wait_volume(kube, namespace, "v2", "Ready", is_ready)
    assert {v1["status"]["host"], v2["status"]["host"]} == set(hosts)

    # 6 GB free on neither host: refused with the reason, and nothing created.
    apply_volume(kube, namespace, "v3", region=name, sizeGb=6)
    v3 = wait_volume(kube, namespace, "v3", "Placed=False", cond_is("Placed", "False", "InsufficientCapacity"))
    assert f"region {name}" in cond(v3, "Placed")["message"] and "6 GB" in cond(v3, "Placed")["message"]
    assert not v3["status"].get("host")
    assert kube.kubectl("-n", namespace, "get", "pvc", "vol-v3", check=False).returncode != 0
    pvs = get(kube, "get", "pv", "-l", f"kubefly.dev/namespace={namespace},kubefly.dev/volume=v3")
    assert pvs["items"] == []

    # Growth within the host's room extends PV and claim; beyond it is refused, size kept.
    kube.kubectl("-n", namespace, "patch", "volume", "v1", "--type=merge", "-p", '{"spec": {"sizeGb": 9}}')
    wait_volume(kube, namespace, "v1", "Resized", cond_is("Resized", "True", "Extended"))
    assert get(kube, "get", "pv", v1["status"]["persistentVolume"])["spec"]["capacity"]["storage"] == "9Gi"
    pvc = get(kube, "-n", namespace, "get", "pvc", "vol-v1")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "9Gi" and pvc["status"]["phase"] == "Bound"
    kube.kubectl("-n", namespace, "patch", "volume", "v1", "--type=merge", "-p", '{"spec": {"sizeGb": 11}}')
    refused = wait_volume(kube, namespace, "v1", "growth refused", cond_is("Resized", "False", "InsufficientCapacity"))
    assert "still 9 GB" in cond(refused, "Resized")["message"]
    assert get(kube, "get", "pv", v1["status"]["persistentVolume"])["spec"]["capacity"]["storage"] == "9Gi"

    # Room freed on a host: the waiting volume is placed there.
    kube.kubectl("-n", namespace, "delete", "volume", "v2", "--wait=true", "--timeout=60s")
    v3 = wait_volume(kube, namespace, "v3", "placed after room freed", is_ready, timeout=90)
    assert v3["status"]["host"] == v2["status"]["host"]


def test_a_region_without_hosts_creates_nothing_and_says_so(kube, namespace):
    apply_volume(kube, namespace, "nowhere", region="zz9")
    v = wait_volume(kube, namespace, "nowhere", "Placed=False", cond_is("Placed", "False", "NoHostInRegion"))
    assert "zz9" in cond(v, "Placed")["message"]
    assert kube.kubectl("-n", namespace, "get", "pvc", "vol-nowhere", check=False).returncode != 0


def test_an_attached_volume_is_not_deleted_until_its_machine_is_gone(kube, namespace):
    apply_volume(kube, namespace, "data")
    v = wait_volume(kube, namespace, "data", "Ready", is_ready)
    pv_name = v["status"]["persistentVolume"]
    machine = {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine",
               "metadata": {"name": "db-1", "namespace": namespace},
               "spec": {"app": "web", "region": "ams", "image": "postgres:17"}}
    kube.kubectl("apply", "-f", "-", input=json.dumps(machine))
    attach(kube, namespace, "data", "db-1")
    kube.kubectl("-n", namespace, "delete", "volume", "data", "--wait=false")

    held = wait_volume(kube, namespace, "data", "deletion held", cond_is("DeletionBlocked", "True", "AttachedToMachine"))
    assert held["metadata"].get("deletionTimestamp")
    assert "Delete Machine db-1" in cond(held, "DeletionBlocked")["message"]

    def event():
        out = get(kube, "-n", namespace, "get", "events", "--field-selector", "involvedObject.name=data,reason=VolumeAttached")
        return out["items"] if out and out["items"] else None
    ev = kube.wait_for("a VolumeAttached event", event)[0]
    assert ev["type"] == "Warning" and "db-1" in ev["message"] and "detach" in ev["message"]
    assert get(kube, "get", "pv", pv_name) is not None
    assert get(kube, "-n", namespace, "get", "pvc", "vol-data") is not None

    kube.kubectl("-n", namespace, "delete", "machine", "db-1", "--wait=false")
    kube.wait_for("the volume to be deleted once detached",
                  lambda: kube.kubectl("-n", namespace, "get", "volume", "data", check=False).returncode != 0, timeout=90)

    def claim_and_pv_gone():
        pvc = get(kube, "-n", namespace, "get", "pvc", "vol-data")
        pv = get(kube, "get", "pv", pv_name)
        return (pvc is None or pvc["metadata"].get("deletionTimestamp")) and (pv is None or pv["metadata"].get("deletionTimestamp"))
    kube.wait_for("the claim and the PV to be deleted", claim_and_pv_gone)


def test_restart_adopts_what_exists_and_releases_a_machine_that_is_gone(kube, namespace, operator):
    for i in range(4):
        apply_volume(kube, namespace, f"d{i}", region="syd")
    operator.kill()  # mid-creation, with no cleanup
    apply_volume(kube, namespace, "d4", region="syd")
    operator.restart()
    for i in range(5):
        wait_volume(kube, namespace, f"d{i}", "Ready after restart", is_ready)
    attach(kube, namespace, "d0", "ghost")  # a machine that never existed (deleted while we were down)
    operator.restart()
    wait_volume(kube, namespace, "d0", "stale attachment cleared", lambda v: not v["status"].get("attachedMachine"))
    pvs = get(kube, "get", "pv", "-l", f"kubefly.dev/namespace={namespace}")["items"]
    pvcs = get(kube, "-n", namespace, "get", "pvc")["items"]
    assert sorted(p["metadata"]["labels"]["kubefly.dev/volume"] for p in pvs) == [f"d{i}" for i in range(5)]
    assert sorted(p["metadata"]["name"] for p in pvcs) == [f"vol-d{i}" for i in range(5)]


@pytest.fixture
def imaged_operator(operator, monkeypatch):
    """The operator as the chart runs it, knowing its own image (KUBEFLY_IMAGE), so deleted Volumes are wiped."""
    monkeypatch.setenv("KUBEFLY_IMAGE", "kubefly:e2e")
    operator.restart()
    yield operator
    monkeypatch.delenv("KUBEFLY_IMAGE")
    operator.restart()


def wipe_pods(kube):
    return get(kube, "-n", "kubefly-system", "get", "pods", "-l", "kubefly.dev/role=volume-wipe")["items"]


def events(kube, namespace, name, reason):
    out = get(kube, "-n", namespace, "get", "events", "--field-selector", f"involvedObject.name={name},reason={reason}")
    return out["items"] if out else []


def gone(kube, namespace, name):
    return lambda: kube.kubectl("-n", namespace, "get", "volume", name, check=False).returncode != 0


def test_a_deleted_volume_is_wiped_by_a_pod_on_its_host_before_the_finalizer_goes(kube, namespace, region, imaged_operator):
    name, _ = region
    apply_volume(kube, namespace, "data", region=name)
    v = wait_volume(kube, namespace, "data", "Ready", is_ready)
    host, uid, path = v["status"]["host"], v["metadata"]["uid"], v["status"]["path"]
    # The directory is this object's own, and the PV records it.
    assert path == f"/var/lib/kubefly/volumes/{namespace}/data.{uid}"
    assert get(kube, "get", "pv", v["status"]["persistentVolume"])["spec"]["hostPath"]["path"] == path
    assert v["status"]["sizeLimit"] == "not enforced"
    row = kube.kubectl("-n", namespace, "get", "volumes", "data").stdout.splitlines()
    assert "LIMIT" in row[0] and "not enforced" in row[1]

    kube.kubectl("-n", namespace, "delete", "volume", "data", "--wait=false")

    def running_wipe_pod():
        # kwok plays the kubelet up to Running (it sets an IP); it never runs the script.
        pods = [p for p in wipe_pods(kube) if p["metadata"]["annotations"].get("kubefly.dev/volume-uid") == uid]
        return pods[0] if pods and (pods[0].get("status") or {}).get("podIP") else None
    pod = kube.wait_for("the wipe pod running on the volume's host", running_wipe_pod)
    assert pod["spec"]["nodeName"] == host
    assert pod["spec"]["volumes"][0]["hostPath"]["path"] == "/var/lib/kubefly/volumes"
    assert pod["spec"]["containers"][0]["image"] == "kubefly:e2e"
    assert pod["spec"]["containers"][0]["command"][-1] == f"{namespace}/data.{uid}"
    held = wait_volume(kube, namespace, "data", "deletion waits for the wipe", cond_is("DeletionBlocked", "True", "WipingData"))
    assert host in cond(held, "DeletionBlocked")["message"]

    # The kubelet's part: the script exited 0.
    done = {"status": {"phase": "Succeeded"}}
    kube.kubectl("-n", "kubefly-system", "patch", "pod", pod["metadata"]["name"], "--subresource=status",
                 "--type=merge", "-p", json.dumps(done))
    kube.wait_for("the volume deleted once wiped", gone(kube, namespace, "data"), timeout=60)
    kube.wait_for("the finished wipe pod removed",
                  lambda: not [p for p in wipe_pods(kube) if p["metadata"]["name"] == pod["metadata"]["name"]
                               and not p["metadata"].get("deletionTimestamp")])
    ev = kube.wait_for("a DataWiped event", lambda: events(kube, namespace, "data", "DataWiped"))[0]
    assert ev["type"] == "Normal" and path in ev["message"]


def test_a_volume_whose_host_is_gone_is_deleted_and_says_where_its_data_stayed(kube, namespace, imaged_operator):
    region = f"v{uuid.uuid4().hex[:6]}"
    host = f"{region}-h1"
    kube.cluster.add_host(host, region, volume_capacity_gb=10)
    try:
        apply_volume(kube, namespace, "lost", region=region)
        v = wait_volume(kube, namespace, "lost", "Ready", is_ready)
        kube.cluster.delete_host(host)
        kube.wait_for("the host gone", lambda: get(kube, "get", "node", host) is None)
        kube.kubectl("-n", namespace, "delete", "volume", "lost", "--wait=false")
        kube.wait_for("the volume deleted although its host is gone", gone(kube, namespace, "lost"), timeout=60)
        ev = kube.wait_for("a DataLeftOnHost event", lambda: events(kube, namespace, "lost", "DataLeftOnHost"))[0]
        assert ev["type"] == "Warning" and host in ev["message"] and v["status"]["path"] in ev["message"]
        assert "gone from the cluster" in ev["message"]
        assert not [p for p in wipe_pods(kube) if p["spec"]["nodeName"] == host and not p["metadata"].get("deletionTimestamp")]
    finally:
        kube.kubectl("delete", "node", host, "--ignore-not-found", "--wait=false")


def test_a_volume_on_a_notready_host_is_deleted_and_its_data_wiped_when_the_host_returns(kube, namespace, imaged_operator):
    region = f"v{uuid.uuid4().hex[:6]}"
    host = f"{region}-h1"
    kube.cluster.add_host(host, region, volume_capacity_gb=10)
    try:
        apply_volume(kube, namespace, "away", region=region)
        v = wait_volume(kube, namespace, "away", "Ready", is_ready)
        kube.cluster.stop_host(host)
        # The controller-manager would say so after its 40 s grace; say it now, as it would.
        unknown = {"status": {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
                                              "message": "Kubelet stopped posting node status."}]}}
        kube.kubectl("patch", "node", host, "--subresource=status", "--type=strategic", "-p", json.dumps(unknown))
        kube.kubectl("-n", namespace, "delete", "volume", "away", "--wait=false")
        held = wait_volume(kube, namespace, "away", "waiting for the wipe", cond_is("DeletionBlocked", "True", "WipingData"))
        assert "NotReady" in cond(held, "DeletionBlocked")["message"]
        # Bounded: after the wait the Volume goes, saying where the data is and that it is wiped on return.
        kube.wait_for("the volume deleted although its host is NotReady", gone(kube, namespace, "away"), timeout=120)
        ev = kube.wait_for("a DataLeftOnHost event", lambda: events(kube, namespace, "away", "DataLeftOnHost"))[0]
        assert ev["type"] == "Warning" and "until it returns" in ev["message"] and v["status"]["path"] in ev["message"]
        (pod,) = [p for p in wipe_pods(kube) if p["metadata"]["annotations"].get("kubefly.dev/volume-uid") == v["metadata"]["uid"]]
        assert pod["spec"]["nodeName"] == host and pod["spec"]["tolerations"] == [{"operator": "Exists"}]

        kube.cluster.start_host(host)
        name = pod["metadata"]["name"]
        kube.wait_for("the wipe pod running on the returned host",
                      lambda: (kube.get("kubefly-system", "pod", name) or {}).get("status", {}).get("podIP"), timeout=60)
        kube.kubectl("-n", "kubefly-system", "patch", "pod", name, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": {"phase": "Succeeded"}}))
        kube.wait_for("the finished wipe pod removed by the operator",
                      lambda: (p := kube.get("kubefly-system", "pod", name)) is None or p["metadata"].get("deletionTimestamp"))
    finally:
        kube.kubectl("delete", "node", host, "--ignore-not-found", "--wait=false")
