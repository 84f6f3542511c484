"""The local control plane itself: the hosts of kind-config.yaml, and host loss."""

import json
import os
import signal
import time

from kubefly import topology
from kubefly.devcluster import KWOK_WORKDIR, LocalCluster
from kubefly.labels import NODE_REGION


def test_hosts_are_kind_configs_with_regions_and_allocatable(kube):
    nodes = json.loads(kube.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    for host in topology.load().hosts:
        node = by_name[host.name]
        assert node["metadata"]["labels"].get(NODE_REGION) == host.region
        assert int(node["status"]["allocatable"]["pods"]) > 0
        assert node["status"]["allocatable"]["memory"].endswith("Gi")
    control_plane = by_name["kubefly-control-plane"]
    assert {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"} in control_plane["spec"]["taints"]


def test_rbac_is_enforced(kube):
    # The default ServiceAccount of a namespace can do nothing cluster-wide.
    proc = kube.kubectl("auth", "can-i", "list", "nodes", "--as", "system:serviceaccount:default:default", check=False)
    assert proc.stdout.strip() == "no"


def test_a_pod_is_scheduled_and_runs_on_a_worker(kube, namespace):
    kube.kubectl("-n", namespace, "run", "probe", "--image=registry.invalid/none:1", "--restart=Never")
    phase = kube.wait_for(
        "pod probe Running",
        lambda: kube.kubectl("-n", namespace, "get", "pod", "probe", "-o", "jsonpath={.status.phase}").stdout == "Running",
    )
    assert phase
    node = kube.kubectl("-n", namespace, "get", "pod", "probe", "-o", "jsonpath={.spec.nodeName}").stdout
    assert node in {h.name for h in topology.load().workers}


def test_added_host_then_stopped_host_goes_not_ready_and_comes_back(kube):
    name = "kubefly-extra-ams"
    kube.cluster.add_host(name, "ams")
    try:
        ready = lambda: kube.kubectl(  # noqa: E731
            "get", "node", name, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
        ).stdout
        assert ready() == "True"
        kube.cluster.stop_host(name)
        # The controller-manager's grace period is 40 s in this cluster.
        kube.wait_for("the stopped host to go NotReady", lambda: ready() in ("Unknown", "False"), timeout=90)
        taints = kube.kubectl("get", "node", name, "-o", "jsonpath={.spec.taints[*].key}").stdout
        assert "node.kubernetes.io/unreachable" in taints
        kube.cluster.start_host(name)
        kube.wait_for("the restarted host to be Ready", lambda: ready() == "True", timeout=60)
    finally:
        kube.cluster.delete_host(name)


def test_a_dead_controller_manager_is_noticed_and_up_rebuilds_the_cluster():
    cluster = LocalCluster("kubefly-e2e-dead-component")
    try:
        cluster.up()
        pidfile = KWOK_WORKDIR / "clusters" / cluster.name / "pids" / "kube-controller-manager.pid"
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not cluster.dead_components() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cluster.dead_components() == ["kube-controller-manager"]
        assert not cluster.healthy()
        cluster.up()
        assert cluster.healthy() and cluster.dead_components() == []
    finally:
        cluster.down()
