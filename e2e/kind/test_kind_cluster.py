"""The kind cluster is complete: real pods on every worker, pod-to-pod traffic
across nodes (CNI), Services (kube-proxy), cluster DNS (coredns) and the region
labels of kind-config.yaml. The pods run kubefly's test app image, which
answers with its machine id. (The mapped host port belongs to kubefly's proxy
on the edge worker: test_kind_platform.py reaches it through that port.)"""

from __future__ import annotations

import ipaddress
import json
import subprocess

import yaml

from .kindlib import KIND_CONFIG, KindCluster

APP_PORT = 8080


def workers(kind: KindCluster) -> dict[str, dict]:
    """Worker node name -> labels, as the cluster reports them."""
    nodes = json.loads(kind.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    return {
        n["metadata"]["name"]: n["metadata"]["labels"]
        for n in nodes
        if "node-role.kubernetes.io/control-plane" not in n["metadata"]["labels"]
    }


def app_pod(kind: KindCluster, name: str, node: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [{
                "name": "app",
                "image": kind.images["testapp"],
                "imagePullPolicy": "Never",
                "env": [{"name": "FLY_MACHINE_ID", "value": name}],
                "ports": [{"containerPort": APP_PORT, "name": "http"}],
                "readinessProbe": {"httpGet": {"path": "/", "port": APP_PORT}, "periodSeconds": 1},
            }],
        },
    }


def wait_ready(kind: KindCluster, namespace: str, *names: str) -> dict[str, dict]:
    kind.kubectl("-n", namespace, "wait", "--for=condition=Ready", "--timeout=180s",
                 *[f"pod/{n}" for n in names], timeout=200)
    return {n: json.loads(kind.kubectl("-n", namespace, "get", "pod", n, "-o", "json").stdout) for n in names}


def fetch_from(kind: KindCluster, namespace: str, pod: str, url: str, check: bool = True) -> str:
    """GET `url` from inside `pod` (the test app image has Python, not curl); the body, stripped."""
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode().strip())"
    return kind.kubectl("-n", namespace, "exec", pod, "--", "/opt/kubefly/bin/python", "-c", code, check=check).stdout.strip()


def test_workers_carry_the_regions_of_kind_config(kind: KindCluster):
    want = sorted(n["labels"]["topology.kubernetes.io/region"] for n in KIND_CONFIG["nodes"] if n["role"] == "worker")
    got = workers(kind)
    regions = sorted(labels.get("topology.kubernetes.io/region", "") for labels in got.values())
    assert regions == want, got
    edge = [name for name, labels in got.items() if labels.get("kubefly.dev/edge") == "true"]
    assert len(edge) == sum(1 for n in KIND_CONFIG["nodes"] if n.get("labels", {}).get("kubefly.dev/edge") == "true")
    ready = kind.kubectl("get", "nodes", "-o", "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status} {end}").stdout.split()
    assert ready == ["True"] * len(KIND_CONFIG["nodes"])


def test_pods_on_every_worker_reach_each_other_by_pod_ip_service_and_dns(kind: KindCluster, namespace: str):
    nodes = sorted(workers(kind))
    names = [f"app-{i}" for i in range(len(nodes))]
    kind.apply([app_pod(kind, name, node) for name, node in zip(names, nodes)], namespace)
    pods = wait_ready(kind, namespace, *names)
    assert {p["spec"]["nodeName"] for p in pods.values()} == set(nodes), "one pod per worker"

    # Pod to pod across nodes, both ways round the ring (CNI routes between hosts).
    for i, src in enumerate(names):
        dst = names[(i + 1) % len(names)]
        ip = pods[dst]["status"]["podIP"]
        assert fetch_from(kind, namespace, src, f"http://{ip}:{APP_PORT}/") == dst

    # A Service in front of the last pod, reached from the first pod's node (kube-proxy).
    target, client = names[-1], names[0]
    kind.apply({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "target"},
        "spec": {"selector": {"app": target}, "ports": [{"port": 80, "targetPort": APP_PORT}]},
    }, namespace)
    cluster_ip = kind.kubectl("-n", namespace, "get", "svc", "target", "-o", "jsonpath={.spec.clusterIP}").stdout
    kind.wait_for("the Service's endpoint", lambda: kind.kubectl(
        "-n", namespace, "get", "endpointslices", "-l", "kubernetes.io/service-name=target",
        "-o", "jsonpath={.items[*].endpoints[*].addresses[*]}").stdout == pods[target]["status"]["podIP"])
    # Every node's kube-proxy programs the Service on its own schedule after the endpoint appears.
    url = f"http://{cluster_ip}/"
    assert kind.wait_for(f"{url} from {client}", lambda: fetch_from(kind, namespace, client, url, check=False)) == target

    # The same Service by its cluster DNS name (coredns), resolved inside the pod.
    fqdn = f"target.{namespace}.svc.cluster.local"
    resolved = kind.kubectl("-n", namespace, "exec", client, "--", "/opt/kubefly/bin/python", "-c",
                            f"import socket; print(socket.gethostbyname({fqdn!r}))").stdout.strip()
    assert resolved == cluster_ip
    assert fetch_from(kind, namespace, client, "http://target/") == target  # the pod's search path


def test_the_test_app_serves_full_and_crashes_when_told(kind: KindCluster, namespace: str):
    node = sorted(workers(kind))[0]
    kind.apply(app_pod(kind, "app", node), namespace)
    wait_ready(kind, namespace, "app")
    code = ("import urllib.request, urllib.error\n"
            "try:\n    urllib.request.urlopen('http://127.0.0.1:8080/full', timeout=5)\n"
            "except urllib.error.HTTPError as e:\n    print(e.code)")
    assert kind.kubectl("-n", namespace, "exec", "app", "--", "/opt/kubefly/bin/python", "-c", code).stdout.strip() == "503"
    kind.kubectl("-n", namespace, "exec", "app", "--", "/opt/kubefly/bin/python", "-c",
                 "import urllib.request\ntry: urllib.request.urlopen('http://127.0.0.1:8080/crash', timeout=5)\nexcept Exception: pass",
                 check=False)
    restarts = kind.wait_for("the crashed app's restart", lambda: int(kind.kubectl(
        "-n", namespace, "get", "pod", "app", "-o", "jsonpath={.status.containerStatuses[0].restartCount}").stdout or 0))
    assert restarts >= 1
    wait_ready(kind, namespace, "app")


def node_containers(kind: KindCluster) -> list[str]:
    return subprocess.run(["docker", "ps", "--filter", f"label=io.x-k8s.kind.cluster={kind.name}", "--format", "{{.Names}}"],
                          capture_output=True, text=True, check=True).stdout.split()


def service_cidr(kind: KindCluster) -> str:
    config = kind.kubectl("-n", "kube-system", "get", "cm", "kubeadm-config", "-o", "jsonpath={.data.ClusterConfiguration}").stdout
    return yaml.safe_load(config)["networking"]["serviceSubnet"]


def guard_rules(node: str, cidr: str) -> list[str]:
    """The Service CIDR rules of hack/kind/node/service-cidr-guard.sh on one node, as `ip rule` prints them."""
    out = subprocess.run(["docker", "exec", node, "ip", "rule", "show"], capture_output=True, text=True, check=True).stdout
    return [" ".join(line.split()) for line in out.splitlines() if f"to {cidr} " in line]


def test_service_cidr_traffic_that_kube_proxy_did_not_rewrite_never_leaves_a_node(kind: KindCluster, namespace: str):
    cidr = service_cidr(kind)
    nodes = node_containers(kind)
    assert len(nodes) == len(KIND_CONFIG["nodes"])
    for node in nodes:
        assert guard_rules(node, cidr) == [f"32000: from all to {cidr} iif lo lookup main",
                                           f"32001: from all to {cidr} unreachable"], node

    # An address in the Service CIDR that no Service has: kube-proxy has no rule
    # for it, exactly as for every Service IP while kube-proxy is not running.
    # Refused on the pod's own node at once (ENETUNREACH), not sent toward the real network.
    unused = str(ipaddress.ip_network(cidr)[-2])
    node = sorted(workers(kind))[0]
    kind.apply(app_pod(kind, "client", node), namespace)
    wait_ready(kind, namespace, "client")
    code = ("import errno, socket, time\nt = time.monotonic()\n"
            f"try:\n    socket.create_connection(({unused!r}, 443), timeout=10)\n    print('connected')\n"
            "except OSError as e:\n    print(errno.errorcode.get(e.errno, e), round(time.monotonic() - t, 2))")
    verdict, *took = kind.kubectl("-n", namespace, "exec", "client", "--", "/opt/kubefly/bin/python", "-c", code).stdout.split()
    assert verdict == "ENETUNREACH" and float(took[0]) < 5, (verdict, took)
    # Services themselves still work through the guard (kube-proxy's DNAT comes before routing).
    api = kind.kubectl("get", "svc", "kubernetes", "-n", "default", "-o", "jsonpath={.spec.clusterIP}").stdout
    connect = f"import socket; socket.create_connection(({api!r}, 443), timeout=10); print('connected')"
    assert kind.kubectl("-n", namespace, "exec", "client", "--", "/opt/kubefly/bin/python", "-c", connect).stdout.strip() == "connected"
