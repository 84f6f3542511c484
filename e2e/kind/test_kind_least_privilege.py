"""The chart's admission policies on real kubelets (charts/kubefly/templates/admission.yaml):
the proxy still autostarts a stopped Machine (it may patch spec.state) and the
agent still writes its own host's checks gate with the kubelet's projected
token, while the same in-cluster tokens are refused an image change and another
host's pod."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from .kindlib import KindCluster

DOMAIN = "kubefly.localhost"
SYSTEM = "kubefly-system"


def in_pod(kind: KindCluster, pod: str, container: str, code: str) -> str:
    """Run `code` with the pod's own ServiceAccount token (in-cluster config); its printed answer."""
    prelude = ("from kubernetes import client, config\n"
               "from kubernetes.client.exceptions import ApiException\n"
               "config.load_incluster_config()\n")
    return kind.kubectl("-n", SYSTEM, "exec", pod, "-c", container, "--", "/opt/kubefly/bin/python", "-c",
                        prelude + code).stdout.strip()


def test_autostart_and_the_checks_gate_work_while_the_same_tokens_are_refused_the_rest(kind: KindCluster, namespace: str):
    kind.apply({
        "apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine", "metadata": {"name": "wake"},
        "spec": {
            "app": "wake", "region": "ams", "image": kind.images["testapp"], "state": "stopped",
            "guest": {"cpuKind": "shared", "cpus": 1, "memoryMb": 256},
            "services": [{"internalPort": 8080, "protocol": "tcp", "autostart": True,
                          "ports": [{"port": 80, "handlers": ["http"]}]}],
            "checks": [{"name": "alive", "type": "http", "port": 8080, "path": "/", "intervalSeconds": 1}],
        },
    }, namespace)
    url = f"http://127.0.0.1:{kind.host_port(8080)}/"

    def answer():
        try:
            req = urllib.request.Request(url, headers={"Host": f"wake.{namespace}.{DOMAIN}"})
            return urllib.request.urlopen(req, timeout=40).read().decode().strip()
        except (urllib.error.HTTPError, OSError):
            return None

    # The edge proxy, with its own token, sets spec.state=started: the policy admits it.
    assert kind.wait_for("the stopped Machine autostarted by a request through the edge", answer, timeout=240) == "wake"
    machine = json.loads(kind.kubectl("-n", namespace, "get", "machine", "wake", "-o", "json").stdout)
    assert machine["spec"]["state"] == "started"
    pod = json.loads(kind.kubectl("-n", namespace, "get", "pod", "wake", "-o", "json").stdout)
    gate = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert gate.get("kubefly.dev/checks") == "True", f"the agent on {pod['spec']['nodeName']} wrote no checks gate: {gate}"

    # The same proxy token may not change the image.
    proxies = json.loads(kind.kubectl("-n", SYSTEM, "get", "pods", "-l", "app.kubernetes.io/component=proxy",
                                      "-o", "json").stdout)["items"]
    refused = in_pod(kind, proxies[0]["metadata"]["name"], "proxy", (
        "try:\n"
        f"    client.CustomObjectsApi().patch_namespaced_custom_object('kubefly.dev', 'v1alpha1', {namespace!r}, 'machines',"
        " 'wake', {'spec': {'image': 'evil:latest'}})\n"
        "    print('ADMITTED')\n"
        "except ApiException as exc:\n"
        "    print(exc.status, exc.body)\n"))
    assert "not the rest of spec" in refused, refused
    assert json.loads(kind.kubectl("-n", namespace, "get", "machine", "wake", "-o", "json").stdout)["spec"]["image"] == kind.images["testapp"]

    # An agent on another host may not write this pod's status (its kubelet token names its own node).
    agents = json.loads(kind.kubectl("-n", SYSTEM, "get", "pods", "-l", "app.kubernetes.io/component=agent",
                                     "-o", "json").stdout)["items"]
    other = next(a for a in agents if a["spec"]["nodeName"] != pod["spec"]["nodeName"])
    refused = in_pod(kind, other["metadata"]["name"], "agent", (
        "try:\n"
        f"    client.CoreV1Api().patch_namespaced_pod_status('wake', {namespace!r}, {{'status': {{'conditions': "
        "[{'type': 'kubefly.dev/checks', 'status': 'False'}]}}, _content_type='application/strategic-merge-patch+json')\n"
        "    print('ADMITTED')\n"
        "except ApiException as exc:\n"
        "    print(exc.status, exc.body)\n"))
    assert f"only write the status of pods on its own host ({other['spec']['nodeName']})" in refused, refused
