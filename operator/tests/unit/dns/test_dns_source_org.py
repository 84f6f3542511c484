"""The org a query is answered in: the asking machine's, known by its pod address."""

from __future__ import annotations

import asyncio

import click
import pytest
from dnslib import RCODE, DNSRecord
from hypothesis import example, given, settings
from hypothesis import strategies as st

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
    server = DnsServer(REPLICA, None, grace=0)
    assert sorted(str(rr.rdata) for rr in resolve(server, "web.internal", "10.244.1.5").rr) == ["10.244.1.5", "10.244.2.5"]
    assert sorted(str(rr.rdata) for rr in resolve(server, "web.internal", "10.244.1.6").rr) == ["10.244.1.6", "10.244.2.6"]
    # An unknown source (not a machine of this host, not allowed) learns nothing, not even NXDOMAIN.
    for source in ("172.18.0.3", "10.244.2.5", "", "not-an-ip"):
        for name in ("web.internal", "nope.internal", "_apps.internal", "example.com"):
            reply = resolve(server, name, source)
            assert reply.header.rcode == RCODE.REFUSED and not reply.rr, (source, name)


def test_a_machine_whose_row_arrives_during_the_grace_is_answered():
    replica = Replica(list(REPLICA.rows))
    server = DnsServer(replica, None, grace=2.0)

    async def ask():
        pending = asyncio.create_task(server.resolve(DNSRecord.question("web.internal", "A").pack(), "udp", "10.244.1.9"))
        await asyncio.sleep(0.3)
        replica.rows.append(row("acme", "a9", "h1", "10.244.1.9"))  # the new machine's row reaches the replica
        return DNSRecord.parse(await pending)

    reply = asyncio.run(ask())
    assert reply.header.rcode == RCODE.NOERROR and "10.244.1.9" in {str(rr.rdata) for rr in reply.rr}
    # A stranger is still REFUSED once the grace is over.
    assert resolve(server, "web.internal", "10.244.1.10").header.rcode == RCODE.REFUSED


def test_an_allowed_host_process_gets_every_org_and_a_machine_stays_a_machine():
    server = DnsServer(REPLICA, None, allow=["172.18.0.0/16", "10.244.1.0/24"], grace=0)
    assert len(resolve(server, "web.internal", "172.18.0.3").rr) == 4
    # Inside an allowed network a machine's address is still answered as that machine.
    assert sorted(str(rr.rdata) for rr in resolve(server, "web.internal", "10.244.1.6").rr) == ["10.244.1.6", "10.244.2.6"]
    assert resolve(server, "web.internal", "172.19.0.3").header.rcode == RCODE.REFUSED


def test_a_fixed_org_answers_only_its_machines_and_allowed_sources():
    server = DnsServer(REPLICA, "acme", allow=["172.18.0.3"], grace=0)
    assert sorted(str(rr.rdata) for rr in resolve(server, "web.internal", "10.244.1.5").rr) == ["10.244.1.5", "10.244.2.5"]
    assert sorted(str(rr.rdata) for rr in resolve(server, "web.internal", "172.18.0.3").rr) == ["10.244.1.5", "10.244.2.5"]
    assert resolve(server, "nope.internal", "10.244.1.5").header.rcode == RCODE.NXDOMAIN
    # Another org's machine on this host gets nothing from an acme resolver.
    assert resolve(server, "web.internal", "10.244.1.6").header.rcode == RCODE.REFUSED


def test_a_bad_label_under_internal_is_formerr():
    server = DnsServer(REPLICA, None, grace=0)
    for name in ("we b.internal", "web\\000x.internal", "w@b.internal", "a.b\\.c.internal"):
        assert resolve(server, name, "10.244.1.5").header.rcode == RCODE.FORMERR, name
    assert resolve(server, "web.internal", "10.244.1.5").header.rcode == RCODE.NOERROR


def test_an_undecodable_query_gets_formerr_with_its_id():
    server = DnsServer(REPLICA, None, grace=0)
    query = DNSRecord.question("web.internal", "A").pack()
    broken = query[:12] + b"\x3fweb"  # a label longer than what follows
    out = asyncio.run(server.resolve(broken, "udp", "10.244.1.5"))
    assert out[:2] == query[:2] and out[3] & 0x0F == RCODE.FORMERR and out[2] & 0x80
    assert asyncio.run(server.resolve(b"\x00\x01", "udp", "10.244.1.5")) is None
    # A response (QR set) is never answered: no reflection between two resolvers.
    assert asyncio.run(server.resolve(bytes([query[0], query[1], 0x80]) + query[3:12] + b"\x3f", "udp", "")) is None


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


def test_forwarding_beyond_its_limit_is_servfail_not_a_new_socket():
    server = DnsServer(REPLICA, None, forward=("127.0.0.1", 9), grace=0)
    server._forwarder.inflight = server._forwarder.limit  # every relay slot taken
    assert resolve(server, "example.com", "10.244.1.5").header.rcode == RCODE.SERVFAIL
    # A stranger never reaches the forwarder at all.
    assert resolve(server, "example.com", "172.18.0.3").header.rcode == RCODE.REFUSED


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(["10.244.1.5", "172.18.0.3"]))
@example(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", "10.244.1.5")  # a pointer loop
def test_any_bytes_get_an_answer_or_nothing_never_an_exception(data, source):
    out = asyncio.run(DnsServer(REPLICA, None, grace=0).resolve(data, "udp", source))
    assert out is None or len(out) >= 12
