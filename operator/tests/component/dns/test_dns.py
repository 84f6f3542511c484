"""`kubefly dns` as a real process over real agents, queried with dnspython over UDP and TCP."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.flags
import dns.resolver
import pytest
import pytest_asyncio
from dnslib import QTYPE, RR, A, DNSRecord

from kubefly.gossip.harness import AgentCluster, free_port

pytestmark = [pytest.mark.component, pytest.mark.asyncio(loop_scope="module")]

KUBEFLY = str(Path(sys.executable).parent / "kubefly")


class Upstream:
    """A tiny real resolver for names outside .internal (the --forward target)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            req = DNSRecord.parse(data)
            reply = req.reply()
            reply.add_answer(RR(req.q.qname, QTYPE.A, rdata=A("192.0.2.7"), ttl=60))
            self.sock.sendto(reply.pack(), addr)

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def start_dns(agent_api: str, *extra: str, ready_source: str = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([KUBEFLY, "dns", "--agent", agent_api, "--listen", f"127.0.0.1:{port}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60  # generous: the machine is shared
    while time.monotonic() < deadline:
        try:
            q = dns.message.make_query("_apps.internal", "TXT")
            if dns.query.udp(q, "127.0.0.1", port=port, timeout=0.5, source=ready_source).rcode() == dns.rcode.NOERROR:
                return proc, port
        except (dns.exception.Timeout, ConnectionRefusedError):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        except (dns.exception.Timeout, ConnectionRefusedError):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.kill()
    raise TimeoutError("dns did not answer")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env():
    c = AgentCluster(3, regions=3)
    procs = []
    upstream = Upstream()
    try:
        await c.start()
        a0, a1, a2 = c.agents
        c.write_machine(a0, "m-local", address="127.0.0.10")
        c.write_machine(a1, "m-v6", address="fdaa::11")
        c.write_machine(a2, "m-far", address="127.0.0.12")
        c.write_machine(a2, "m-stopped", address="127.0.0.13", state="stopped")
        c.write_machine(a1, "m-sick", address="127.0.0.14",
                        checks=[{"name": "t", "type": "tcp", "port": free_port(), "interval_seconds": 1}])
        c.write_machine(a1, "db-1", app="db", address="127.0.0.20")
        c.write_machine(a1, "other-org", org="globex", app="secret", address="127.0.0.30")
        keys = [("acme", m) for m in ("m-local", "m-v6", "m-far", "m-stopped", "db-1")]
        assert await c.converge(c.agents, lambda v: all(k in v for k in keys)
                                and v.get(("acme", "m-sick"), {}).get("check_status") == "failing")
        # The tests ask from 127.0.0.1, a host process: allowed explicitly.
        p, port = start_dns(a0.api, "--org", "acme", "--allow-source", "127.0.0.1")
        procs.append(p)
        pf, fport = start_dns(a0.api, "--org", "acme", "--forward", f"127.0.0.1:{upstream.port}",
                              "--allow-source", "127.0.0.1/32")
        procs.append(pf)
        # As the chart runs it: no --org, no allowed sources; only machines of host a0 may ask.
        ps, sport = start_dns(a0.api, "--forward", f"127.0.0.1:{upstream.port}", ready_source="127.0.0.10")
        procs.append(ps)
        yield {"port": port, "fport": fport, "sport": sport, "cluster": c, "upstream": upstream}
    finally:
        for p in procs:
            p.terminate()
            p.wait(5)
        upstream.close()
        await c.close()


def ask(port: int, name: str, rdtype: str, tcp: bool = False, source: str | None = None):
    q = dns.message.make_query(name, rdtype)
    fn = dns.query.tcp if tcp else dns.query.udp
    return fn(q, "127.0.0.1", port=port, timeout=3, source=source)


def addrs(resp) -> set[str]:
    return {r.to_text() for rrset in resp.answer for r in rrset}


def txt(resp) -> str:
    return "".join(s.decode() for rrset in resp.answer for r in rrset for s in r.strings)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_app_names(env, tcp):
    port = env["port"]
    # started + passing only: the stopped and the failing machines are not answered
    assert addrs(ask(port, "web.internal", "A", tcp)) == {"127.0.0.10", "127.0.0.12"}
    assert addrs(ask(port, "global.web.internal", "AAAA", tcp)) == {"fdaa::11"}
    assert addrs(ask(port, "r2.web.internal", "A", tcp)) == {"127.0.0.12"}
    assert addrs(ask(port, "m-v6.vm.web.internal", "AAAA", tcp)) == {"fdaa::11"}
    resp = ask(port, "web.internal", "A", tcp)
    assert resp.rcode() == dns.rcode.NOERROR and all(rrset.ttl <= 5 for rrset in resp.answer)


async def test_nearest_puts_own_host_first(env):
    port = env["port"]
    assert addrs(ask(port, "top1.nearest.of.web.internal", "A")) == {"127.0.0.10"}
    assert len(addrs(ask(port, "top2.nearest.of.web.internal", "A"))) == 2


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_txt_names(env, tcp):
    port = env["port"]
    assert sorted(txt(ask(port, "vms.web.internal", "TXT", tcp)).split(",")) == ["m-far r2", "m-local r0", "m-v6 r1"]
    assert txt(ask(port, "regions.web.internal", "TXT", tcp)) == "r0,r1,r2"
    # the DNS serves one org: globex's app is not listed
    assert txt(ask(port, "_apps.internal", "TXT", tcp)) == "db,web"


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_unknown_and_foreign_names(env, tcp):
    port = env["port"]
    for name in ("nope.internal", "nope.vm.web.internal", "r9.web.internal", "secret.internal", "x.y.z.web.internal"):
        assert ask(port, name, "A", tcp).rcode() == dns.rcode.NXDOMAIN, name
    known_no_data = ask(port, "db.internal", "AAAA", tcp)
    assert known_no_data.rcode() == dns.rcode.NOERROR and not known_no_data.answer
    assert ask(port, "example.com", "A", tcp).rcode() == dns.rcode.REFUSED


async def test_forwarding(env):
    resp = ask(env["fport"], "example.com", "A")
    assert resp.rcode() == dns.rcode.NOERROR and addrs(resp) == {"192.0.2.7"}
    assert addrs(ask(env["fport"], "web.internal", "A")) == {"127.0.0.10", "127.0.0.12"}


async def test_answers_follow_the_replica(env):
    c = env["cluster"]
    c.write_machine(c.agents[1], "m-new", address="127.0.0.40")
    deadline = time.monotonic() + 10
    while "127.0.0.40" not in addrs(ask(env["port"], "web.internal", "A")) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert "127.0.0.40" in addrs(ask(env["port"], "web.internal", "A"))
    c.delete_machine(c.agents[1], "m-new")
    deadline = time.monotonic() + 10
    while "127.0.0.40" in addrs(ask(env["port"], "web.internal", "A")) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert "127.0.0.40" not in addrs(ask(env["port"], "web.internal", "A"))


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_stub_resolver(env, tcp):
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = env["port"]
    r.lifetime = 5
    got = r.resolve("web.internal", "A", tcp=tcp)
    assert {a.to_text() for a in got} == {"127.0.0.10", "127.0.0.12"} and got.rrset.ttl <= 5
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("nope.internal", "A", tcp=tcp)


async def test_large_answers_truncate_over_udp_and_complete_over_tcp(env):
    c = env["cluster"]
    a = c.agents[2]
    for i in range(40):
        c.write_machine(a, f"bulk-{i:02d}", app="bulk", address=f"127.0.1.{i + 1}")
    assert await c.converge([c.agents[0]], lambda v: sum(k[1].startswith("bulk-") for k in v) == 40)
    deadline = time.monotonic() + 10
    while len(addrs(ask(env["port"], "bulk.internal", "A", tcp=True))) < 40 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    q = dns.message.make_query("bulk.internal", "A")  # no EDNS: 512 bytes
    small = dns.query.udp(q, "127.0.0.1", port=env["port"], timeout=3)
    assert small.flags & dns.flags.TC and not small.answer
    q = dns.message.make_query("bulk.internal", "A", use_edns=0, payload=4096)
    assert len(addrs(dns.query.udp(q, "127.0.0.1", port=env["port"], timeout=3))) == 40
    assert len(addrs(ask(env["port"], "bulk.internal", "A", tcp=True))) == 40


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_only_this_hosts_machines_may_ask(env, tcp):
    """No --org, no allowed sources (as the chart runs it): a stranger is REFUSED everything,
    .internal and forwarding alike; a machine of this host is answered in its own org."""
    port = env["sport"]
    local = "127.0.0.10"  # m-local (acme) on host a0, the resolver's own host
    assert addrs(ask(port, "web.internal", "A", tcp, source=local)) == {"127.0.0.10", "127.0.0.12"}
    apps = set(txt(ask(port, "_apps.internal", "TXT", tcp, source=local)).split(","))
    assert {"db", "web"} <= apps and "secret" not in apps  # globex's app is not acme's to see
    if not tcp:  # the upstream serves UDP only
        assert addrs(ask(port, "example.com", "A", source=local)) == {"192.0.2.7"}
    # 127.0.0.30 is globex's machine, on another host; 127.0.0.1 is no machine. Each waits out
    # the 1 s grace (a machine whose row is on its way), then gets REFUSED.
    for stranger in ("127.0.0.1", "127.0.0.30"):
        for name in ("secret.internal", "_apps.internal", "example.com"):
            resp = ask(port, name, "A" if "apps" not in name else "TXT", tcp, source=stranger)
            assert resp.rcode() == dns.rcode.REFUSED and not resp.answer, (stranger, name)


async def test_bad_labels_and_undecodable_queries_get_formerr(env):
    port = env["port"]
    q = dns.message.make_query("web.internal", "A")
    q.question[0].name = dns.name.Name([b"we b", b"internal", b""])
    assert dns.query.udp(q, "127.0.0.1", port=port, timeout=3).rcode() == dns.rcode.FORMERR
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fweb", ("127.0.0.1", port))
        out = s.recv(512)
    assert out[:2] == b"\x12\x34" and out[3] & 0x0F == dns.rcode.FORMERR


async def test_tcp_slow_bodies_time_out_and_connections_are_capped(env):
    port = env["port"]
    # A client that sends a length and never the body is cut off (TCP_READ_S), not kept.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x00\x40web")
    await writer.drain()
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 30) == b""
    print(f"slow body cut after {time.monotonic() - started:.1f}s")
    writer.close()
    # One source holds at most 16 connections: the next is closed at once, the held ones still answer.
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(16)]
    try:
        await asyncio.sleep(0.2)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
        wire = dns.message.make_query("web.internal", "A").to_wire()
        r0, w0 = held[0]
        w0.write(len(wire).to_bytes(2, "big") + wire)
        n = int.from_bytes(await asyncio.wait_for(r0.readexactly(2), 10), "big")
        assert dns.message.from_wire(await r0.readexactly(n)).rcode() == dns.rcode.NOERROR
    finally:
        for _, w in held:
            w.close()
