"""Two operator replicas: the holder of the leadership Lease is active, the other stands by."""

from __future__ import annotations

import json


def test_a_second_replica_stands_by_while_the_first_keeps_working(kube, operator, standby_operator, namespace):
    lease = json.loads(kube.kubectl("-n", kube.release_namespace, "get", "lease", "kubefly-operator", "-o", "json").stdout)
    assert lease["spec"]["holderIdentity"] == operator.identity
    assert "waiting for the leadership lease" in standby_operator.logs()

    kube.apply({"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine",
                "metadata": {"name": "peer-1", "namespace": namespace},
                "spec": {"app": "web", "region": "syd", "image": "nginx:1.27"}})
    kube.wait_for("the active replica to start the machine",
                  lambda: ((kube.get(namespace, "machine", "peer-1") or {}).get("status") or {}).get("state") == "started")
    assert "peer-1" in operator.logs()
    assert "peer-1" not in standby_operator.logs(), "the standby replica handled an object"
    assert "leadership acquired" not in standby_operator.logs()
