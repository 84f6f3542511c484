"""Private services on kind: a Machine whose service has no public port (as a
PostgresCluster member's) is not reachable through the mapped edge proxy port,
while one with a public http port is; giving the private one a public port
makes it reachable, so the refusal is the privacy rule, not a missing route."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from .kindlib import KindCluster

DOMAIN = "kubefly.localhost"  # the proxy's default platform domain


def machine(kind: KindCluster, name: str, app: str, ports: list[dict] | None) -> dict:
    service = {"internalPort": 8080, "protocol": "tcp"}
    if ports is not None:
        service["ports"] = ports
    return {
        "apiVersion": "kubefly.dev/v1alpha1",
        "kind": "Machine",
        "metadata": {"name": name},
        "spec": {"app": app, "region": "ams", "image": kind.images["testapp"],
                 "guest": {"cpuKind": "shared", "cpus": 1, "memoryMb": 256}, "services": [service]},
    }


def test_a_private_service_is_not_reachable_through_the_edge(kind: KindCluster, namespace: str):
    url = f"http://127.0.0.1:{kind.host_port(8080)}/"

    def answer(app: str) -> tuple[int, str]:
        req = urllib.request.Request(url, headers={"Host": f"{app}.{namespace}.{DOMAIN}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode().strip()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode().strip()
        except OSError as exc:
            return 0, str(exc)

    def ready(names: set[str]):
        pods = json.loads(kind.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout)["items"]
        up = {p["metadata"]["name"] for p in pods
              if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}
        return up >= names

    # The private machine first and Ready (its row gossiped as routable), then the public one.
    kind.apply(machine(kind, "vault-1", "vault", None), namespace)
    kind.wait_for("vault-1's pod Running and Ready", lambda: ready({"vault-1"}), timeout=180)
    kind.apply(machine(kind, "open-1", "open", [{"port": 80, "handlers": ["http"]}]), namespace)
    kind.wait_for("open-1 answering through the edge",
                  lambda: answer("open") == (200, "open-1"), timeout=180)

    # The edge knows both by now; the private one stays "no app" (the old fallback routed it at once).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body = answer("vault")
        assert status == 404 and "no app" in body and "vault-1" not in body, (status, body)
        time.sleep(1)

    # A public http port on the same machine (a replace) makes it reachable.
    kind.apply(machine(kind, "vault-1", "vault", [{"port": 80, "handlers": ["http"]}]), namespace)
    kind.wait_for("vault-1 answering through the edge once public",
                  lambda: answer("vault") == (200, "vault-1"), timeout=180)
