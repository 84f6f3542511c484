"""`.internal` DNS from inside a Machine on kind: the chart's `kubefly dns` on
every host answers from the local agent's replica, reached through the dns
Service (internalTrafficPolicy: Local) the operator names as Machines'
nameserver; other names go on to the cluster DNS."""

from __future__ import annotations

import json

from .kindlib import RELEASE, RELEASE_NAMESPACE, KindCluster
from .test_kind_machines import machine

APP = "dnsapp"


def pods_ready(kind: KindCluster, namespace: str, names: set[str]) -> dict[str, dict] | None:
    pods = json.loads(kind.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout)["items"]
    ready = {p["metadata"]["name"]: p for p in pods if p["metadata"]["name"] in names and p["status"].get("podIP")
             and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}
    return ready if set(ready) == names else None


def lookup(kind: KindCluster, namespace: str, pod: str, name: str) -> list[str] | str:
    """The addresses `name` resolves to inside `pod` (its libc resolver, its resolv.conf), or the error."""
    code = ("import socket\ntry:\n"
            f"    print(' '.join(sorted({{a[4][0] for a in socket.getaddrinfo({name!r}, 80, type=socket.SOCK_STREAM)}})))\n"
            "except socket.gaierror as e:\n    print('error', e)")
    out = kind.kubectl("-n", namespace, "exec", pod, "-c", "machine", "--", "/opt/kubefly/bin/python", "-c", code).stdout.strip()
    return out if out.startswith("error") else sorted(out.split())


def with_app(spec: dict, app: str) -> dict:
    spec["spec"]["app"] = app
    return spec


def test_internal_names_resolve_inside_a_machine_to_its_orgs_started_machines(kind: KindCluster, namespace: str):
    regions = {"dns-ams": "ams", "dns-iad": "iad"}
    kind.apply([with_app(machine(kind, name, region), APP) for name, region in regions.items()], namespace)
    # The same app name in another org (namespace): never in this org's answers.
    other = f"{namespace}-other"
    kind.kubectl("create", "namespace", other)
    try:
        kind.apply(with_app(machine(kind, "dns-foreign", "ams"), APP), other)
        pods = kind.wait_for("both Machines' pods Ready", lambda: pods_ready(kind, namespace, set(regions)), timeout=180)
        foreign = kind.wait_for("the foreign Machine's pod Ready", lambda: pods_ready(kind, other, {"dns-foreign"}), timeout=180)
        ips = {name: p["status"]["podIP"] for name, p in pods.items()}

        # The pod asks the dns Service, and keeps the cluster's search path.
        dns_ip = kind.kubectl("-n", RELEASE_NAMESPACE, "get", "svc", f"{RELEASE}-dns", "-o", "jsonpath={.spec.clusterIP}").stdout
        spec = pods["dns-ams"]["spec"]
        assert spec["dnsPolicy"] == "None" and spec["dnsConfig"]["nameservers"] == [dns_ip]
        assert spec["dnsConfig"]["searches"][0] == f"{namespace}.svc.cluster.local"

        client = "dns-ams"
        # Agents learn of the instances by gossip: poll until every started machine is in the answer.
        assert kind.wait_for(f"{APP}.internal from {client}",
                             lambda: (got := lookup(kind, namespace, client, f"{APP}.internal")) == sorted(ips.values()) and got,
                             timeout=60)
        assert foreign["dns-foreign"]["status"]["podIP"] not in ips.values()
        assert lookup(kind, namespace, client, f"iad.{APP}.internal") == [ips["dns-iad"]]
        assert lookup(kind, namespace, client, f"ams.{APP}.internal") == [ips["dns-ams"]]
        assert lookup(kind, namespace, client, f"syd.{APP}.internal").startswith("error")  # no machine there: NXDOMAIN
        assert lookup(kind, namespace, client, "no-such-app.internal").startswith("error")
        # Names outside .internal reach the cluster DNS: a Service, short and qualified.
        api = kind.kubectl("get", "svc", "kubernetes", "-n", "default", "-o", "jsonpath={.spec.clusterIP}").stdout
        assert lookup(kind, namespace, client, "kubernetes.default") == [api]
        assert lookup(kind, namespace, client, "kubernetes.default.svc.cluster.local") == [api]

        # Only started machines: a stopped one leaves the answers.
        kind.kubectl("-n", namespace, "patch", "machine", "dns-iad", "--type=merge", "-p", '{"spec":{"state":"stopped"}}')
        assert kind.wait_for(f"{APP}.internal without the stopped machine",
                             lambda: lookup(kind, namespace, client, f"{APP}.internal") == [ips["dns-ams"]], timeout=60)
        # The foreign org's machine sees its own org's app only.
        assert kind.wait_for("the foreign org's own answer", lambda: lookup(kind, other, "dns-foreign", f"{APP}.internal")
                             == [foreign["dns-foreign"]["status"]["podIP"]], timeout=60)
    finally:
        kind.kubectl("delete", "namespace", other, "--wait=false", check=False)
