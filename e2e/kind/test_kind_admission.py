"""Volume admission on kind: the chart's webhook, served by both operator replicas through
its Service, refuses a fork that does not fit at `kubectl apply`, naming the field."""

from __future__ import annotations

import json
import uuid

from .kindlib import KindCluster

API = "kubefly.dev/v1alpha1"
NS = "kubefly-system"


def volume(name: str, app: str, size_gb: int = 1, **spec) -> dict:
    return {"apiVersion": API, "kind": "Volume", "metadata": {"name": name},
            "spec": {"app": app, "region": "ams", "sizeGb": size_gb, **spec}}


def apply(kind: KindCluster, namespace: str, manifest: dict):
    return kind.kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(manifest), check=False)


def operator_pods(kind: KindCluster) -> list[dict]:
    out = kind.kubectl("-n", NS, "get", "pods", "-l", "app.kubernetes.io/component=operator", "-o", "json").stdout
    return [p for p in json.loads(out)["items"] if p["status"].get("phase") == "Running"]


def test_every_operator_replica_answers_the_volume_webhook(kind: KindCluster, namespace: str):
    """Leader and standby alike: both pods Ready (their readiness is the webhook's), and each refuses a
    fork of nothing when asked directly (the API server's pod proxy, over the webhook's own TLS port)."""
    pods = kind.wait_for("two Ready operator replicas", lambda: (ps := operator_pods(kind)) and len(ps) == 2 and all(
        any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])) for p in ps)
        and ps, timeout=120)
    leader = json.loads(kind.kubectl("-n", NS, "get", "lease", "kubefly-operator", "-o", "json").stdout)["spec"]["holderIdentity"]
    assert leader in {p["metadata"]["name"] for p in pods}
    endpoints = kind.kubectl("-n", NS, "get", "endpointslices", "-l", "kubernetes.io/service-name=kubefly-operator-webhook",
                             "-o", "json").stdout
    ready = {e["targetRef"]["name"] for s in json.loads(endpoints)["items"] for e in s.get("endpoints") or []
             if (e.get("conditions") or {}).get("ready")}
    assert ready == {p["metadata"]["name"] for p in pods}, "the webhook's Service reaches every replica"
    for pod in pods:
        name = pod["metadata"]["name"]
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": str(uuid.uuid4()), "operation": "CREATE", "namespace": namespace, "name": "ghost",
            "kind": {"group": "kubefly.dev", "version": "v1alpha1", "kind": "Volume"},
            "object": {**volume("ghost", "web", forkFrom="nope"), "metadata": {"name": "ghost", "namespace": namespace}}}}
        out = kind.kubectl("create", "--raw", f"/api/v1/namespaces/{NS}/pods/https:{name}:9443/proxy/validate/volumes",
                           "-f", "-", input=json.dumps(review)).stdout
        answer = json.loads(out)["response"]
        assert answer["uid"] == review["request"]["uid"] and answer["allowed"] is False, (name, answer)
        assert answer["status"]["message"] == f"spec.forkFrom: there is no Volume nope in namespace {namespace}: " \
                                              f"fork an existing volume of app web", (name, answer)


def test_kubectl_apply_of_a_fork_that_does_not_fit_fails_naming_the_field(kind: KindCluster, namespace: str):
    assert apply(kind, namespace, volume("db", "admdb", size_gb=2)).returncode == 0
    refusals = {
        "another app's volume": (volume("stolen", "admother", size_gb=2, forkFrom="db"),
                                 'The Volume "stolen" is invalid: spec.forkFrom: volume db belongs to app admdb, not admother'),
        "a volume that does not exist": (volume("ghost", "admdb", forkFrom="nope"),
                                         f'The Volume "ghost" is invalid: spec.forkFrom: there is no Volume nope in namespace {namespace}'),
        "a fork smaller than its source": (volume("small", "admdb", size_gb=1, forkFrom="db"),
                                           'The Volume "small" is invalid: spec.sizeGb: 1 is smaller than volume db\'s 2 GB'),
    }
    for what, (manifest, message) in refusals.items():
        proc = apply(kind, namespace, manifest)
        assert proc.returncode != 0, f"{what}: kubectl apply succeeded: {proc.stdout}"
        assert message in proc.stderr, f"{what}: {proc.stderr}"
    items = json.loads(kind.kubectl("-n", namespace, "get", "volumes", "-o", "json").stdout)["items"]
    assert [v["metadata"]["name"] for v in items] == ["db"], "nothing was created"
