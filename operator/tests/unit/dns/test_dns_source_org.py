"""The org a query is answered in: the asking machine's, known by its pod address."""

from __future__ import annotations

import asyncio

import click
import pytest
from dnslib import RCODE, DNSRecord

from kubefly.dns.cli import _resolv_conf_nameserver
from kubefly.dns.server import DnsServer, org_of_source
from kubefly.instances import Instance


class Replica:
    self_host = "h1"

    def __init__(self, rows):
        self.rows = rows

    def instances(self, org=None, app=None):
        return [i for i in self.rows if (org is None or i.org == org) and (app is None or i.app == app)]

    def apps(self):
        return {(i.org, i.app) for i in self.rows}

    def rtt(self, host):
        return 0.0


def row(org, mid, host, addr, app="web"):
    return Instance(org=org, app=app, machine_id=mid, instance_id=mid, region="ams", host=host, address=addr,
                    state="started", check_status="passing")


REPLICA = Replica([
    row("acme", "a1", "h1", "10.244.1.5"),
    row("acme", "a2", "h2", "10.244.2.5"),
    row("globex", "g1", "h1", "10.244.1.6"),
    row("globex", "g2", "h2", "10.244.2.6"),
    row("globex", "v6", "h1", "[fd00::6]"),
])


def test_the_source_names_the_org_of_a_machine_on_this_host_only():
    assert org_of_source(REPLICA, "10.244.1.5") == "acme"
    assert org_of_source(REPLICA, "fd00::6") == "globex"
    # A machine on another host never queries this resolver; its address here is someone else's.
    assert org_of_source(REPLICA, "10.244.2.5") is None
    assert org_of_source(REPLICA, "10.0.0.1") is None
    assert org_of_source(REPLICA, "") is None


def resolve(server: DnsServer, name: str, source: str) -> DNSRecord:
    out = asyncio.run(server.resolve(DNSRecord.question(name, "A").pack(), "udp", source))
    return DNSRecord.parse(out)


def test_a_machine_sees_its_own_orgs_app_only():
    server = DnsServer(REPLICA, None)
    assert sorted(str(rr.rdata) for rr in resolve(server, "web.internal", "10.244.1.5").rr) == ["10.244.1.5", "10.244.2.5"]
    assert sorted(str(rr.rdata) for rr in resolve(server, "web.internal", "10.244.1.6").rr) == ["10.244.1.6", "10.244.2.6"]
    # An unknown source (a host process) gets every org's, as a resolver without --org always did.
    assert len(resolve(server, "web.internal", "172.18.0.3").rr) == 4


def test_a_fixed_org_wins_over_the_source():
    server = DnsServer(REPLICA, "acme")
    assert sorted(str(rr.rdata) for rr in resolve(server, "web.internal", "10.244.1.6").rr) == ["10.244.1.5", "10.244.2.5"]
    assert resolve(server, "nope.internal", "10.244.1.6").header.rcode == RCODE.NXDOMAIN


def test_forward_resolv_conf_takes_its_first_nameserver(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("search ns.svc.cluster.local\nnameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n")
    assert _resolv_conf_nameserver(conf) == "10.96.0.10:53"
    conf.write_text("nameserver fe80::1%eth0\n")
    assert _resolv_conf_nameserver(conf) == "[fe80::1]:53"
    conf.write_text("search x\n")
    with pytest.raises(click.BadParameter, match="no nameserver"):
        _resolv_conf_nameserver(conf)
    with pytest.raises(click.BadParameter, match="--forward HOST:PORT"):
        _resolv_conf_nameserver(tmp_path / "missing")
