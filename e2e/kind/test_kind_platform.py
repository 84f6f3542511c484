"""kubefly installed by Helm from its own images: the operator runs in the
cluster as the chart's Deployment, healthy, and the API answers for Machines."""

from __future__ import annotations

import json

from .kindlib import RELEASE, RELEASE_NAMESPACE, KindCluster


def test_the_operator_runs_in_the_cluster_from_kubeflys_image(kind: KindCluster):
    deploy = json.loads(kind.kubectl("-n", RELEASE_NAMESPACE, "get", "deployment", f"{RELEASE}-operator", "-o", "json").stdout)
    assert deploy["status"].get("readyReplicas") == deploy["spec"]["replicas"] >= 1
    pods = json.loads(kind.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l",
                                   "app.kubernetes.io/component=operator", "-o", "json").stdout)["items"]
    running = [p for p in pods if p["status"]["phase"] == "Running"]
    assert running, [p["status"] for p in pods]
    pod = running[0]
    assert pod["spec"]["containers"][0]["image"] == kind.images["kubefly"]
    assert pod["spec"]["serviceAccountName"] == RELEASE
    # /healthz through the API server's pod proxy: the process itself answers, in its pod.
    health = kind.kubectl("get", "--raw",
                          f"/api/v1/namespaces/{RELEASE_NAMESPACE}/pods/{pod['metadata']['name']}:8080/proxy/healthz")
    assert health.returncode == 0


def test_kubectl_get_machines_answers(kind: KindCluster):
    out = kind.kubectl("get", "machines", "-A")
    assert out.returncode == 0
    assert "error" not in out.stderr.lower()
