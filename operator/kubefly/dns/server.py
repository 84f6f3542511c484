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
answered. Who may ask: a machine on this host (its pod address is the query's
source; with `--org`, only that org's machines), or a source in the allowed
list (`--allow-source`, host processes). Anyone else gets REFUSED for every
name (after UNKNOWN_GRACE_S, in case it is a machine whose row is on its way),
so the resolver neither tells other orgs' names nor forwards for strangers.
The org a name is looked up in is the asking machine's; for an allowed source,
`--org` when set, else every org. Unknown names under .internal are NXDOMAIN; a
known name with no record of the asked type is NOERROR with no answer; a label
under .internal that is not letters, digits, `-` or `_` is FORMERR. Other names
are REFUSED, or forwarded when a resolver is configured (one shared socket,
at most MAX_FORWARDS in flight).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
import struct
import time
from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSRecord
from prometheus_client import Counter

from kubefly import logs
from kubefly.instances import Instance

log = logs.get("kubefly.dns")

QUERIES = Counter("kubefly_dns_queries_total", "DNS queries answered", ["transport", "rcode"])

ZONE = "internal"
_LABEL = re.compile(rb"[A-Za-z0-9_-]{1,63}")
# Resource bounds: a client may hold this many TCP connections (all clients: MAX_TCP), and
# must send a query's bytes within TCP_READ_S; at most MAX_FORWARDS relayed queries at once.
MAX_TCP = 256
MAX_TCP_PER_SOURCE = 16
TCP_IDLE_S = 10.0
TCP_READ_S = 5.0
MAX_FORWARDS = 512
FORWARD_TIMEOUT_S = 3.0
# A machine's first queries can come before its row (with its address) reaches this host's
# replica: an unknown source is looked up again for up to UNKNOWN_GRACE_S before REFUSED,
# at most MAX_WAITING queries at once (beyond that, REFUSED at once).
UNKNOWN_GRACE_S = 1.0
MAX_WAITING = 128
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


def machine_orgs(replica: Replica) -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    """Pod address -> org, for the machines on this host."""
    out = {}
    for inst in replica.instances():
        if inst.host != replica.self_host or not inst.address:
            continue
        try:
            out[ipaddress.ip_address(inst.address.strip("[]"))] = inst.org
        except ValueError:
            continue
    return out


def org_of_source(replica: Replica, source: str, index: dict | None = None) -> str | None:
    """The org of the machine on this host whose pod address sent a query; None when
    no machine here has that address (a host process, or a pod not yet in the replica)."""
    try:
        ip = ipaddress.ip_address(source)
    except ValueError:
        return None
    return (machine_orgs(replica) if index is None else index).get(ip)


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


def formerr(data: bytes) -> bytes | None:
    """A FORMERR answer to a query too broken to parse: its id and opcode, no question.
    Nothing for fewer than 12 bytes (no header to answer) or a response (no reflection)."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    flags = 0x8000 | (data[2] & 0x78) << 8 | RCODE.FORMERR  # QR, the query's opcode
    return data[:2] + struct.pack(">HHHHH", flags, 0, 0, 0, 0)


def labels_ok(request: DNSRecord) -> bool:
    """Names under .internal are made of letters, digits, `-` and `_` (what kubefly names are)."""
    labels = request.q.qname.label
    if not labels or labels[-1].lower() != ZONE.encode():
        return True  # not ours to judge: REFUSED or relayed as asked
    return all(_LABEL.fullmatch(x) for x in labels)


class _Forwarder(asyncio.DatagramProtocol):
    """Names outside .internal relayed over one connected UDP socket (only the upstream's
    datagrams reach it), each query under a fresh random id that maps back to the client's."""

    def __init__(self, target: tuple[str, int], limit: int):
        self.target, self.limit = target, limit
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[asyncio.Future, bytes]] = {}
        self.inflight = 0  # UDP and TCP relays together

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, remote_addr=self.target)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def datagram_received(self, data: bytes, addr) -> None:
        entry = self.pending.pop(int.from_bytes(data[:2], "big"), None) if len(data) >= 12 else None
        if entry is not None and not entry[0].done():
            entry[0].set_result(entry[1] + data[2:])

    def error_received(self, exc: Exception) -> None:
        log.warning("forward failed", error=str(exc) or type(exc).__name__)

    async def relay(self, data: bytes, transport: str) -> bytes | None:
        if self.inflight >= self.limit:
            return None
        self.inflight += 1
        try:
            return await (self._tcp(data) if transport == "tcp" else self._udp(data))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            log.warning("forward failed", error=str(exc) or type(exc).__name__)
            return None
        finally:
            self.inflight -= 1

    async def _udp(self, data: bytes) -> bytes | None:
        if self.transport is None:
            return None
        qid = secrets.randbelow(65536)
        while qid in self.pending:
            qid = secrets.randbelow(65536)
        fut = asyncio.get_running_loop().create_future()
        self.pending[qid] = (fut, data[:2])
        try:
            self.transport.sendto(qid.to_bytes(2, "big") + data[2:])
            return await asyncio.wait_for(fut, FORWARD_TIMEOUT_S)
        finally:
            if self.pending.get(qid, (None,))[0] is fut:
                del self.pending[qid]

    async def _tcp(self, data: bytes) -> bytes:
        r, w = await asyncio.wait_for(asyncio.open_connection(*self.target), 2.0)
        try:
            w.write(struct.pack(">H", len(data)) + data)
            await w.drain()
            (n,) = struct.unpack(">H", await asyncio.wait_for(r.readexactly(2), FORWARD_TIMEOUT_S))
            return await asyncio.wait_for(r.readexactly(n), FORWARD_TIMEOUT_S)
        finally:
            w.close()


class DnsServer:
    def __init__(self, replica: Replica, org: str | None, ttl: int = 5,
                 forward: tuple[str, int] | None = None, allow: Iterable[str] = (), grace: float = UNKNOWN_GRACE_S):
        self.replica, self.org, self.ttl, self.grace = replica, org, ttl, grace
        # Sources that are not machines but may ask (host processes), as networks.
        self.allow = tuple(ipaddress.ip_network(a, strict=False) for a in allow)
        self._forwarder = _Forwarder(forward, MAX_FORWARDS) if forward is not None else None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tcp_open: Tally[str] = Tally()
        self._waiting = 0  # queries from unknown sources waiting out UNKNOWN_GRACE_S
        self._machines_index: dict = {}
        self._machines_at = -1.0

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                asyncio.ensure_future(server._udp_query(data, addr))

        if self._forwarder is not None:
            await self._forwarder.start()
        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(host, port))
        self._tcp = await asyncio.start_server(self._tcp_conn, host, port)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        if self._forwarder is not None:
            self._forwarder.close()

    def _machines(self) -> dict:
        # Rebuilt at most every 100 ms: a query costs a dict lookup, not a scan of every row.
        now = time.monotonic()
        if now - self._machines_at > 0.1:
            self._machines_index, self._machines_at = machine_orgs(self.replica), now
        return self._machines_index

    def asker(self, source: str) -> tuple[bool, str | None, bool]:
        """(may ask, the org to answer in, whether `source` is a machine of this host)."""
        machine_org = org_of_source(self.replica, source, self._machines())
        if machine_org is not None:
            # A machine is judged as a machine, never by the allowed list its address may fall in.
            return self.org is None or machine_org == self.org, machine_org, True
        try:
            ip = ipaddress.ip_address(source)
        except ValueError:
            return False, None, False
        return any(ip in net for net in self.allow), self.org, False

    async def _asker_with_grace(self, source: str) -> tuple[bool, str | None]:
        allowed, org, machine = self.asker(source)
        if allowed or machine or self.grace <= 0 or self._waiting >= MAX_WAITING:
            return allowed, org
        self._waiting += 1
        try:
            deadline = time.monotonic() + self.grace
            while not (allowed or machine) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                allowed, org, machine = self.asker(source)
        finally:
            self._waiting -= 1
        return allowed, org

    async def resolve(self, data: bytes, transport: str, source: str = "") -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except (DNSError, struct.error, IndexError, ValueError, UnicodeError):
            QUERIES.labels(transport, "FORMERR").inc()
            return formerr(data)
        if request.header.qr or not request.questions:
            return None
        allowed, org = await self._asker_with_grace(source)
        if not allowed:
            reply = request.reply()
            reply.header.ra = 0
            reply.header.rcode = RCODE.REFUSED
        elif not labels_ok(request):
            reply = request.reply()
            reply.header.ra = 0
            reply.header.rcode = RCODE.FORMERR
        else:
            reply = answer(self.replica, org, request, self.ttl)
        if reply is None:
            if self._forwarder is not None:
                out = await self._forwarder.relay(data, transport)
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
        source = (writer.get_extra_info("peername") or ("",))[0]
        if sum(self._tcp_open.values()) >= MAX_TCP or self._tcp_open[source] >= MAX_TCP_PER_SOURCE:
            QUERIES.labels("tcp", "CONN_REFUSED").inc()
            writer.close()
            return
        self._tcp_open[source] += 1
        try:
            while True:
                (n,) = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S))
                # The body within a bound too: a sender trickling bytes holds no connection for long.
                out = await self.resolve(await asyncio.wait_for(reader.readexactly(n), TCP_READ_S), "tcp", source)
                if out is None:
                    break
                writer.write(struct.pack(">H", len(out)) + out)
                await asyncio.wait_for(writer.drain(), TCP_READ_S)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            pass
        finally:
            self._tcp_open[source] -= 1
            if self._tcp_open[source] <= 0:
                del self._tcp_open[source]
            writer.close()
