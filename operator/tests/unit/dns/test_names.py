from __future__ import annotations

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from kubefly.dns.server import Name, answer, parse
from kubefly.instances import Instance


@pytest.mark.parametrize("qname,want", [
    ("web.internal", Name("app", "web")),
    ("WEB.Internal.", Name("app", "web")),
    ("global.web.internal", Name("app", "web")),
    ("ams.web.internal", Name("region", "web", region="ams")),
    ("top3.nearest.of.web.internal", Name("nearest", "web", n=3)),
    ("abc123.vm.web.internal", Name("vm", "web", machine="abc123")),
    ("vms.web.internal", Name("vms", "web")),
    ("regions.web.internal", Name("regions", "web")),
    ("_apps.internal", Name("apps")),
    ("internal", None),
    ("web.example.com", None),
    ("top0.nearest.of.web.internal", None),
    ("topx.nearest.of.web.internal", None),
    ("a.b.c.web.internal", None),
    ("web.vms.internal", None),
    ("_x.web.internal", None),
])
def test_parse(qname, want):
    assert parse(qname) == want


class Replica:
    self_host = "h1"

    def __init__(self, rows, rtts):
        self.rows, self.rtts = rows, rtts

    def instances(self, org=None, app=None):
        return [i for i in self.rows if (org is None or i.org == org) and (app is None or i.app == app)]

    def apps(self):
        return {(i.org, i.app) for i in self.rows}

    def rtt(self, host):
        return 0.0 if host == self.self_host else self.rtts.get(host)


def row(mid, host, addr, region="r0", app="web", org="acme", **kw):
    return Instance(org=org, app=app, machine_id=mid, instance_id=mid, region=region, host=host, address=addr,
                    state=kw.get("state", "started"), check_status=kw.get("check", "passing"))


REPLICA = Replica([
    row("far", "h3", "10.0.0.3", "r2"),
    row("near", "h2", "10.0.0.2", "r1"),
    row("mine", "h1", "fdaa::1"),
    row("local4", "h1", "10.0.0.1"),
    row("down", "h2", "10.0.0.9", state="stopped"),
    row("sick", "h2", "10.0.0.8", check="failing"),
    row("x", "h2", "10.9.9.9", org="other", app="hidden"),
], {"h2": 0.001, "h3": 0.05})


def ask(name, qtype="A", org="acme"):
    return answer(REPLICA, org, DNSRecord.question(name, qtype), 5)


def ips(reply):
    return [str(rr.rdata) for rr in reply.rr]


def test_families_routability_and_ttl():
    assert sorted(ips(ask("web.internal"))) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert ips(ask("web.internal", "AAAA")) == ["fdaa::1"]
    assert all(rr.ttl == 5 for rr in ask("web.internal").rr)


def test_nearest_orders_by_rtt_with_own_host_first():
    assert ips(ask("top2.nearest.of.web.internal")) == ["10.0.0.1", "10.0.0.2"]
    assert ips(ask("top1.nearest.of.web.internal", "AAAA")) == ["fdaa::1"]


def test_txt_and_nxdomain_and_org_scope():
    assert str(ask("regions.web.internal", "TXT").rr[0].rdata) == '"r0,r1,r2"'
    assert str(ask("_apps.internal", "TXT").rr[0].rdata) == '"web"'
    assert ask("hidden.internal").header.rcode == RCODE.NXDOMAIN
    assert ask("hidden.internal", org=None).header.rcode == RCODE.NOERROR
    assert ask("down.vm.web.internal").header.rcode == RCODE.NOERROR and not ask("down.vm.web.internal").rr
    assert ask("nope.vm.web.internal").header.rcode == RCODE.NXDOMAIN
    assert answer(REPLICA, "acme", DNSRecord.question("example.com", "A"), 5) is None
    assert ask("vms.web.internal", "A").rr == [] and ask("vms.web.internal", "A").header.rcode == RCODE.NOERROR


def test_long_txt_is_split_into_strings():
    many = Replica([row(f"machine-{i:03d}", "h1", f"10.1.0.{i}") for i in range(60)], {})
    reply = answer(many, "acme", DNSRecord.question("vms.web.internal", "TXT"), 5)
    strings = reply.rr[0].rdata.data
    assert len(strings) > 1 and all(len(s) <= 255 for s in strings)
    assert b"".join(strings).decode().count(",") == 59
    assert QTYPE[reply.rr[0].rtype] == "TXT"
