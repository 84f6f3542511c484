"""Gossip and DNS on the real control plane: one agent per kind-config host,
each watching only its own host's pods with the chart's agent identity.
Machines started and stopped through the operator show up in every agent's
replica and in `.internal` DNS."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import pytest

from kubefly import topology
from kubefly.ports import free_port

pytestmark = pytest.mark.usefixtures("operator")
KUBEFLY = Path(sys.executable).with_name("kubefly")
AGENT_SERVICE_ACCOUNT = "kubefly-agent"


@pytest.fixture
def agents(kube, tmp_path):
    """An agent per worker host plus a DNS server on the first, as local processes."""
    kubeconfig = kube.cluster.service_account_kubeconfig(kube.release_namespace, AGENT_SERVICE_ACCOUNT, tmp_path / "agent.kubeconfig")
    key = tmp_path / "cluster.key"
    key.write_text(secrets.token_urlsafe(32))
    hosts = topology.load().workers
    ports = [(free_port(), free_port()) for _ in hosts]
    procs = []
    for host, (gossip, api) in zip(hosts, ports):
        # The region comes from the host's Node label, as in the DaemonSet.
        cmd = [str(KUBEFLY), "agent", "--host", host.name, "--gossip", f"127.0.0.1:{gossip}",
               "--api", f"127.0.0.1:{api}", "--key-file", str(key), "--source", "pods",
               "--seed", f"127.0.0.1:{ports[0][0]}"]
        log = (tmp_path / f"{host.name}.log").open("w")
        procs.append(subprocess.Popen(cmd, env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=log, stderr=log))
    apis = [f"http://127.0.0.1:{api}" for _, api in ports]
    dns_port = free_port()
    dns_log = (tmp_path / "dns.log").open("w")
    procs.append(subprocess.Popen(
        # The test asks from 127.0.0.1, no machine's address: a host process, allowed explicitly.
        [str(KUBEFLY), "dns", "--agent", apis[0], "--listen", f"127.0.0.1:{dns_port}", "--allow-source", "127.0.0.1"],
        stdout=dns_log, stderr=dns_log))

    def healthy():
        for p in procs:
            if p.poll() is not None:
                logs = "\n".join(f.read_text()[-1500:] for f in tmp_path.glob("*.log"))
                pytest.fail(f"an agent or dns exited with {p.returncode}:\n{logs}", pytrace=False)
        try:
            return all(urllib.request.urlopen(f"{a}/healthz", timeout=2).status == 200 for a in apis)
        except OSError:
            return False

    kube.wait_for("every agent healthy", healthy, timeout=60)
    kube.wait_for("the DNS server to answer", lambda: answers(dns_port, "_apps.internal", dns.rdatatype.TXT) is not None)
    yield apis, dns_port
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def replica(api: str, org: str) -> dict[str, dict]:
    with urllib.request.urlopen(f"{api}/v1/instances?org={org}", timeout=5) as resp:
        body = json.load(resp)
    return {row["machine_id"]: row for row in body["instances"]}


def answers(port: int, name: str, rdtype):
    """The DNS response, or None while the server does not answer yet."""
    try:
        return dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=2)
    except dns.exception.Timeout:
        return None


def a_records(port: int, name: str) -> set[str] | None:
    answer = answers(port, name, dns.rdatatype.A)
    return None if answer is None else {item.address for rrset in answer.answer for item in rrset}


def machine(namespace: str, name: str, region: str, state: str = "started") -> dict:
    return {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine", "metadata": {"name": name, "namespace": namespace},
            "spec": {"app": "web", "region": region, "image": "nginx:1.27", "state": state}}


def test_started_and_stopped_machines_reach_every_replica_and_dns(kube, namespace, agents):
    apis, dns_port = agents
    kube.apply(machine(namespace, "web-ams", "ams"))
    kube.apply(machine(namespace, "web-iad", "iad"))

    def everywhere_started():
        views = [replica(api, namespace) for api in apis]
        ok = all(
            {"web-ams", "web-iad"} <= set(v) and all(v[m]["state"] == "started" and v[m]["address"] for m in ("web-ams", "web-iad"))
            for v in views
        )
        return views if ok else None

    views = kube.wait_for("both machines started in every agent's replica", everywhere_started, timeout=60)
    for view in views:
        assert view["web-ams"]["region"] == "ams" and view["web-iad"]["region"] == "iad"
        assert view["web-ams"]["host"] == kube.get(namespace, "machine", "web-ams")["status"]["host"]
    pod_ip = {m: kube.get(namespace, "pod", m)["status"]["podIP"] for m in ("web-ams", "web-iad")}
    assert views[0]["web-ams"]["address"] == pod_ip["web-ams"]

    kube.wait_for("web.internal to answer both", lambda: a_records(dns_port, "web.internal") == set(pod_ip.values()))
    assert a_records(dns_port, "ams.web.internal") == {pod_ip["web-ams"]}
    assert a_records(dns_port, "web-iad.vm.web.internal") == {pod_ip["web-iad"]}

    # Stopping a machine takes it out of every replica's routable set and out of DNS; its row stays,
    # stopped and without an address, from its host's agent (which reads the Machine): the proxy's
    # autostart candidate. A machine applied stopped is a row too: created, placed, never booted.
    kube.apply(machine(namespace, "web-iad", "iad", state="stopped"))
    kube.apply(machine(namespace, "web-lazy", "ams", state="stopped"))

    def stopped_everywhere():
        views = [replica(api, namespace) for api in apis]
        ok = all(v.get("web-iad", {}).get("state") == "stopped" and v.get("web-lazy", {}).get("state") == "created"
                 for v in views)
        return views if ok else None

    views = kube.wait_for("web-iad stopped and web-lazy created in every replica", stopped_everywhere, timeout=60)
    for name in ("web-iad", "web-lazy"):
        host = kube.get(namespace, "machine", name)["status"]["host"]
        assert {(v[name]["host"], v[name]["address"]) for v in views} == {(host, "")}
    kube.wait_for("web.internal to answer only web-ams", lambda: a_records(dns_port, "web.internal") == {pod_ip["web-ams"]})
