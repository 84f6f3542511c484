"""Two operator replicas: Kopf peering keeps the higher priority active and the other standing by."""

from __future__ import annotations

import json


def test_a_second_replica_stands_by_while_the_first_keeps_working(kube, operator, standby_operator, namespace):
    def registered():
        status = json.loads(kube.kubectl("get", "clusterkopfpeering", "kubefly", "-o", "json").stdout).get("status") or {}
        priorities = sorted(peer.get("priority") for peer in status.values() if isinstance(peer, dict))
        return priorities if standby_operator.priority in priorities and len(priorities) >= 2 else None

    kube.wait_for("both replicas registered in the peering", registered)

    kube.apply({"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine",
                "metadata": {"name": "peer-1", "namespace": namespace},
                "spec": {"app": "web", "region": "syd", "image": "nginx:1.27"}})
    kube.wait_for("the active replica to start the machine",
                  lambda: ((kube.get(namespace, "machine", "peer-1") or {}).get("status") or {}).get("state") == "started")
    assert "peer-1" in operator.logs()
    assert "peer-1" not in standby_operator.logs(), "the standby replica handled an object while paused"
