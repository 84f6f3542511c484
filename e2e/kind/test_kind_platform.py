"""kubefly installed by Helm from its own images: the operator runs in the
cluster as the chart's Deployment, healthy, and the API answers for Machines;
an agent on every worker gossips with the others; the proxy on the edge worker
answers on kind-config.yaml's mapped host port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

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


def test_agents_on_every_worker_see_each_other(kind: KindCluster):
    ds = json.loads(kind.kubectl("-n", RELEASE_NAMESPACE, "get", "daemonset", f"{RELEASE}-agent", "-o", "json").stdout)
    workers = kind.kubectl("get", "nodes", "-l", "!node-role.kubernetes.io/control-plane", "-o", "name").stdout.split()
    assert ds["status"]["desiredNumberScheduled"] == len(workers)
    kind.wait_for("every agent Ready", lambda: json.loads(kind.kubectl(
        "-n", RELEASE_NAMESPACE, "get", "daemonset", f"{RELEASE}-agent", "-o", "json").stdout)["status"].get("numberReady") == len(workers))
    pods = json.loads(kind.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=agent",
                                   "-o", "json").stdout)["items"]
    regions = {n["metadata"]["name"]: n["metadata"]["labels"].get("topology.kubernetes.io/region")
               for n in json.loads(kind.kubectl("get", "nodes", "-o", "json").stdout)["items"]}
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:7947/v1/members', timeout=5).read().decode())"

    def members(pod):
        out = kind.kubectl("-n", RELEASE_NAMESPACE, "exec", pod, "--", "/opt/kubefly/bin/python", "-c", code, check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    for pod in pods:
        node = pod["spec"]["nodeName"]
        # Each agent knows its host and region, and every other worker's agent is alive to it.
        view = kind.wait_for(f"the agent on {node} to see the others", lambda: (m := members(pod["metadata"]["name"])) and
                             len([x for x in m["members"] if x["state"] == "alive"]) == len(workers) - 1 and m)
        assert view["self"]["host"] == node and view["self"]["region"] == regions[node]
        assert {x["host"] for x in view["members"]} == {w.removeprefix("node/") for w in workers} - {node}


def test_the_proxy_answers_on_the_mapped_host_port(kind: KindCluster):
    """kind-config.yaml's extraPortMappings reach the proxy's hostPort on the edge worker;
    every other worker runs a proxy that takes only the edges' hops."""
    def proxies(component):
        pods = json.loads(kind.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", f"app.kubernetes.io/component={component}",
                                       "-o", "json").stdout)["items"]
        return sorted(f"node/{p['spec']['nodeName']}" for p in pods)
    edge = kind.kubectl("get", "nodes", "-l", "kubefly.dev/edge=true", "-o", "name").stdout.split()
    others = kind.kubectl("get", "nodes", "-l", "kubefly.dev/edge!=true,!node-role.kubernetes.io/control-plane",
                          "-o", "name").stdout.split()
    assert proxies("proxy") == sorted(edge)
    assert proxies("proxy-host") == sorted(others) and others
    url = f"http://127.0.0.1:{kind.host_port(8080)}/"
    request = urllib.request.Request(url, headers={"Host": "no-such-app.kubefly.localhost"})

    def answer():
        try:
            urllib.request.urlopen(request, timeout=3)
        except urllib.error.HTTPError as exc:
            return exc
        except OSError:
            return None

    err = kind.wait_for(f"the proxy at {url}", answer)
    # The kubefly proxy itself answered (not some other listener): its error header names the reason.
    assert err.code == 404 and err.headers["kubefly-error"] == "unknown-app"


def test_a_hosts_hop_port_refuses_a_caller_without_the_platform_token(kind: KindCluster):
    """Anyone on the hosts' network who reaches a proxy's hop port, naming an instance and forging
    Fly-Client-IP, is refused; the token is the operator's Secret, not something the chart rendered."""
    secret = json.loads(kind.kubectl("-n", RELEASE_NAMESPACE, "get", "secret", "kubefly-hop-token", "-o", "json").stdout)
    assert len(secret["data"]["token"]) >= 40 and "meta.helm.sh/release-name" not in (secret["metadata"].get("annotations") or {})
    pods = json.loads(kind.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component in (proxy,proxy-host)",
                                   "-o", "json").stdout)["items"]
    assert pods
    for pod in pods:
        ip = pod["status"]["hostIP"]
        req = urllib.request.Request(f"http://{ip}:4281/", headers={
            "Host": "web.kubefly.localhost", "kubefly-instance": "kind/web/web-0", "Fly-Client-IP": "6.6.6.6",
            "kubefly-hop-token": "guessed"})
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError(f"the hop port of {pod['spec']['nodeName']} answered a caller without the token")
        except urllib.error.HTTPError as exc:
            assert exc.code == 403 and exc.headers["kubefly-error"] == "hop-token", (pod["spec"]["nodeName"], exc.code)
    # A process on a host's network (here, run inside the agent's own pod) cannot report loads, nor
    # partition the agent from its peers: the load API wants the proxies' token, fault injection is off.
    agent = json.loads(kind.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=agent",
                                    "-o", "json").stdout)["items"][0]["metadata"]["name"]
    code = ("import urllib.request, urllib.error\n"
            "for path, body in (('/v1/load', b'{\"loads\": []}'), ('/v1/admin/partition', b'{\"drop\": []}')):\n"
            "    try:\n"
            "        print(urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:7947' + path, data=body,"
            " headers={'Content-Type': 'application/json'}), timeout=5).status)\n"
            "    except urllib.error.HTTPError as e:\n"
            "        print(e.code)\n")
    out = kind.kubectl("-n", RELEASE_NAMESPACE, "exec", agent, "--", "/opt/kubefly/bin/python", "-c", code).stdout.split()
    assert out == ["401", "404"], out
