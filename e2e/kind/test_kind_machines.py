"""Machines on kind: a Machine becomes a real Running pod on a worker of its
region, running the app image, and the edge proxy routes a request through
kind-config.yaml's mapped host port to it (agents gossip where it runs)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from .kindlib import KindCluster

DOMAIN = "kubefly.localhost"  # the proxy's default platform domain


def machine(kind: KindCluster, name: str, region: str) -> dict:
    return {
        "apiVersion": "kubefly.dev/v1alpha1",
        "kind": "Machine",
        "metadata": {"name": name},
        "spec": {
            "app": "hello",
            "region": region,
            "image": kind.images["testapp"],
            "guest": {"cpuKind": "shared", "cpus": 1, "memoryMb": 256},
            "services": [{"internalPort": 8080, "protocol": "tcp", "ports": [{"port": 80, "handlers": ["http"]}]}],
        },
    }


def test_machines_run_as_pods_in_their_region_and_answer_through_the_proxy(kind: KindCluster, namespace: str):
    regions = {"hello-1": "ams", "hello-2": "iad"}
    kind.apply([machine(kind, name, region) for name, region in regions.items()], namespace)
    node_region = {n["metadata"]["name"]: n["metadata"]["labels"].get("topology.kubernetes.io/region")
                   for n in json.loads(kind.kubectl("get", "nodes", "-o", "json").stdout)["items"]}

    def running():
        pods = json.loads(kind.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout)["items"]
        ready = {p["metadata"]["name"]: p for p in pods
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}
        return ready if set(ready) >= set(regions) else None

    pods = kind.wait_for("both Machines' pods Running and Ready", running, timeout=180)
    for name, region in regions.items():
        pod = pods[name]
        assert node_region[pod["spec"]["nodeName"]] == region
        assert pod["spec"]["containers"][0]["image"] == kind.images["testapp"]

    url = f"http://127.0.0.1:{kind.host_port(8080)}/"
    request = urllib.request.Request(url, headers={"Host": f"hello.{namespace}.{DOMAIN}"})

    def answer(path: str = ""):
        try:
            return urllib.request.urlopen(urllib.request.Request(url + path, headers=request.headers), timeout=5).read().decode().strip()
        except (urllib.error.HTTPError, OSError):
            return None

    # The agents learn of the instances by gossip; then the proxy routes to one.
    assert kind.wait_for(f"{url} routed to a hello Machine", answer, timeout=120) in regions

    # A machine answering "full" (503 + kubefly-full) is retried on the other one, whichever the edge tried first.
    for taker in regions:
        got = {answer(f"full?except={taker}") for _ in range(6)}
        assert got == {taker}, f"every request for /full?except={taker} answered by {taker}, got {got}"

    # With the ams machine stopped, the edge (an ams worker) must hop to the iad worker's proxy.
    kind.kubectl("-n", namespace, "patch", "machine", "hello-1", "--type=merge", "-p", '{"spec":{"state":"stopped"}}')
    assert kind.wait_for(f"{url} routed to hello-2 on another worker, through its host's proxy",
                         lambda: answer() == "hello-2" and "hello-2", timeout=120) == "hello-2"
