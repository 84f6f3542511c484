"""`.internal` DNS answered from the local agent's replica.

Names (per app; the org is fixed by configuration, see docs/gossip.md):
  <app>.internal, global.<app>.internal      AAAA/A of the app's routable instances
  <region>.<app>.internal                    ... in one region
  top<N>.nearest.of.<app>.internal           ... the N nearest by RTT from this host
  <machine-id>.vm.<app>.internal             ... one machine
  vms.<app>.internal      TXT "<machine-id> <region>,..."
  regions.<app>.internal  TXT "<region>,..."
  _apps.internal          TXT "<app>,..."
Only routable instances (started, checks passing, with an address) are
answered. The org a name is looked up in is the resolver's `--org` when set,
else the org of the machine on this host that asked (its pod address is the
query's source), else every org. Unknown names under .internal are NXDOMAIN; a known name with no
record of the asked type is NOERROR with no answer. Other names are REFUSED,
or forwarded when a resolver is configured.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Protocol

from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSRecord
from prometheus_client import Counter

from kubefly import logs
from kubefly.instances import Instance

log = logs.get("kubefly.dns")

QUERIES = Counter("kubefly_dns_queries_total", "DNS queries answered", ["transport", "rcode"])

ZONE = "internal"
_TOP = re.compile(r"^top(\d{1,3})$")
_RESERVED = {"vms", "regions", "global", "_apps"}


class Replica(Protocol):
    self_host: str

    def instances(self, org: str | None = None, app: str | None = None) -> list[Instance]: ...
    def apps(self) -> set[tuple[str, str]]: ...
    def rtt(self, host: str) -> float | None: ...


@dataclass(frozen=True)
class Name:
    kind: str  # apps | app | region | nearest | vm | vms | regions
    app: str = ""
    region: str = ""
    machine: str = ""
    n: int = 0


def parse(qname: str) -> Name | None:
    """The meaning of a name under .internal; None when it has none (NXDOMAIN)."""
    labels = qname.rstrip(".").lower().split(".")
    if len(labels) < 2 or labels[-1] != ZONE or any(not x for x in labels):
        return None
    rest = labels[:-1]
    if rest == ["_apps"]:
        return Name("apps")
    app, front = rest[-1], rest[:-1]
    if app in _RESERVED:
        return None
    if not front:
        return Name("app", app)
    if len(front) == 1:
        label = front[0]
        if label == "global":
            return Name("app", app)
        if label in ("vms", "regions"):
            return Name(label, app)
        if label == "_apps" or label.startswith("_"):
            return None
        return Name("region", app, region=label)
    if len(front) == 2 and front[1] == "vm":
        return Name("vm", app, machine=front[0])
    if len(front) == 3 and front[1:] == ["nearest", "of"]:
        m = _TOP.match(front[0])
        if m and int(m.group(1)) >= 1:
            return Name("nearest", app, n=int(m.group(1)))
    return None


def select(replica: Replica, org: str | None, name: Name) -> list[Instance] | None:
    """Routable instances a name stands for; None when the app (or machine) is unknown."""
    orgs = [org] if org is not None else sorted(o for o, a in replica.apps() if a == name.app)
    rows = [i for o in orgs for i in replica.instances(o, name.app)]
    if not rows:
        return None
    if name.kind == "vm":
        rows = [i for i in rows if i.machine_id.lower() == name.machine]
        if not rows:
            return None
    live = [i for i in rows if i.routable]
    if name.kind == "region":
        if not any(i.region == name.region for i in rows):
            return None
        live = [i for i in live if i.region == name.region]
    elif name.kind == "nearest":
        def distance(i: Instance) -> tuple[float, str]:
            r = replica.rtt(i.host)
            return (r if r is not None else float("inf"), i.machine_id)

        live = sorted(live, key=distance)  # truncated to N after the address-family filter
    return sorted(live, key=lambda i: i.machine_id) if name.kind != "nearest" else live


def org_of_source(replica: Replica, source: str) -> str | None:
    """The org of the machine on this host whose pod address sent a query; None when
    no machine here has that address (a host process, or a pod not yet in the replica)."""
    try:
        ip = ipaddress.ip_address(source)
    except ValueError:
        return None
    for inst in replica.instances():
        if inst.host != replica.self_host or not inst.address:
            continue
        try:
            if ipaddress.ip_address(inst.address.strip("[]")) == ip:
                return inst.org
        except ValueError:
            continue
    return None


def _txt(value: str) -> TXT:
    # A TXT string is at most 255 bytes: long lists are split into several strings.
    data = value.encode()
    return TXT([data[i:i + 255] for i in range(0, len(data), 255)] or [b""])


def answer(replica: Replica, org: str | None, request: DNSRecord, ttl: int) -> DNSRecord | None:
    """The reply for a query under .internal; None when the name is outside .internal."""
    q = request.q
    qname = str(q.qname)
    labels = qname.rstrip(".").lower().split(".")
    if labels[-1] != ZONE:
        return None
    reply = request.reply()
    reply.header.ra = 0
    if any(rr.rtype == QTYPE.OPT for rr in request.ar):
        reply.add_ar(EDNS0(udp_len=4096))
    name = parse(qname)
    qtype = QTYPE[q.qtype]
    if name is None:
        return _nx(reply, ttl)
    if name.kind == "apps":
        apps = sorted({a for o, a in replica.apps() if org is None or o == org})
        if qtype in ("TXT", "ANY"):
            reply.add_answer(RR(q.qname, QTYPE.TXT, rdata=_txt(",".join(apps)), ttl=ttl))
        return reply
    rows = select(replica, org, Name("app", name.app) if name.kind in ("vms", "regions") else name)
    if rows is None:
        return _nx(reply, ttl)
    if name.kind == "vms":
        if qtype in ("TXT", "ANY"):
            value = ",".join(f"{i.machine_id} {i.region}" for i in rows)
            reply.add_answer(RR(q.qname, QTYPE.TXT, rdata=_txt(value), ttl=ttl))
        return reply
    if name.kind == "regions":
        if qtype in ("TXT", "ANY"):
            value = ",".join(sorted({i.region for i in rows}))
            reply.add_answer(RR(q.qname, QTYPE.TXT, rdata=_txt(value), ttl=ttl))
        return reply
    records = []
    for inst in rows:
        try:
            ip = ipaddress.ip_address(inst.address.strip("[]"))
        except ValueError:
            continue
        if ip.version == 6 and qtype in ("AAAA", "ANY"):
            records.append(RR(q.qname, QTYPE.AAAA, rdata=AAAA(str(ip)), ttl=ttl))
        elif ip.version == 4 and qtype in ("A", "ANY"):
            records.append(RR(q.qname, QTYPE.A, rdata=A(str(ip)), ttl=ttl))
    for rr in records[: name.n] if name.kind == "nearest" else records:
        reply.add_answer(rr)
    return reply


def _nx(reply: DNSRecord, ttl: int) -> DNSRecord:
    reply.header.rcode = RCODE.NXDOMAIN
    reply.add_auth(RR(ZONE + ".", QTYPE.SOA, ttl=ttl, rdata=SOA(
        "ns." + ZONE + ".", "hostmaster." + ZONE + ".", (1, ttl, ttl, ttl, ttl))))
    return reply


def udp_limit(query: bytes) -> int:
    """The UDP payload the client accepts: 512, or its EDNS0 size (capped at 4096)."""
    try:
        req = DNSRecord.parse(query)
    except (DNSError, struct.error, IndexError, ValueError):
        return 512
    for rr in req.ar:
        if rr.rtype == QTYPE.OPT:
            return max(512, min(int(rr.rclass), 4096))
    return 512


class DnsServer:
    def __init__(self, replica: Replica, org: str | None, ttl: int = 5,
                 forward: tuple[str, int] | None = None):
        self.replica, self.org, self.ttl, self.forward = replica, org, ttl, forward
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                asyncio.ensure_future(server._udp_query(data, addr))

        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(host, port))
        self._tcp = await asyncio.start_server(self._tcp_conn, host, port)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    async def resolve(self, data: bytes, transport: str, source: str = "") -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, ValueError):
            QUERIES.labels(transport, "FORMERR").inc()
            return None
        if request.header.qr or not request.questions:
            return None
        org = self.org if self.org is not None else org_of_source(self.replica, source)
        reply = answer(self.replica, org, request, self.ttl)
        if reply is None:
            if self.forward is not None:
                out = await self._forward(data, transport)
                if out is not None:
                    QUERIES.labels(transport, "FORWARDED").inc()
                    return out
                reply = request.reply()
                reply.header.rcode = RCODE.SERVFAIL
            else:
                reply = request.reply()
                reply.header.ra = 0
                reply.header.rcode = RCODE.REFUSED
        QUERIES.labels(transport, RCODE[reply.header.rcode]).inc()
        return reply.pack()

    async def _forward(self, data: bytes, transport: str) -> bytes | None:
        assert self.forward is not None
        loop = asyncio.get_running_loop()
        try:
            if transport == "tcp":
                r, w = await asyncio.wait_for(asyncio.open_connection(*self.forward), 2.0)
                try:
                    w.write(struct.pack(">H", len(data)) + data)
                    await w.drain()
                    (n,) = struct.unpack(">H", await asyncio.wait_for(r.readexactly(2), 3.0))
                    return await asyncio.wait_for(r.readexactly(n), 3.0)
                finally:
                    w.close()
            fut: asyncio.Future = loop.create_future()

            class Fwd(asyncio.DatagramProtocol):
                def datagram_received(self, resp: bytes, addr) -> None:
                    if not fut.done():
                        fut.set_result(resp)

            t, _ = await loop.create_datagram_endpoint(Fwd, remote_addr=self.forward)
            try:
                t.sendto(data)
                return await asyncio.wait_for(fut, 3.0)
            finally:
                t.close()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            log.warning("forward failed", error=str(exc) or type(exc).__name__)
            return None

    async def _udp_query(self, data: bytes, addr) -> None:
        out = await self.resolve(data, "udp", addr[0])
        if out is not None and self._udp is not None:
            if len(out) > udp_limit(data):
                # Too big for this client over UDP: truncate, it retries over TCP.
                reply = DNSRecord.parse(out)
                reply.rr = []
                reply.header.tc = 1
                out = reply.pack()
            self._udp.sendto(out, addr)

    async def _tcp_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("",)
        try:
            while True:
                (n,) = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 10.0))
                out = await self.resolve(await reader.readexactly(n), "tcp", peer[0])
                if out is None:
                    break
                writer.write(struct.pack(">H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()
