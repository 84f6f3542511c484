"""The host agent: source of truth for its own host, replica of everyone else's.

One asyncio process per host. UDP carries SWIM probes and push gossip of
signed records; TCP carries anti-entropy sync (digest, then the records of
the origins that differ, both ways). Every row change goes through one path:
`_ingest` for received records, `_write` for this host's own rows.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prometheus_client import Counter, Gauge, Histogram

from kubefly import logs
from kubefly.gossip import hlc as hlcmod
from kubefly.gossip.checks import MachineChecks
from kubefly.gossip.membership import ALIVE, DEAD, SUSPECT, Member, Membership, parse_update
from kubefly.gossip.sources import LocalMachine
from kubefly.gossip.store import Store, validate
from kubefly.gossip.wire import (HELLO_FRAME, MAX_DATAGRAM, Keys, Record, WireError, decode_dgram, encode_dgram, read_frame,
                                 sign_record, verify_record, write_frame)
from kubefly.instances import Instance, InstanceState

log = logs.get("kubefly.gossip.agent")

Key = tuple[str, str]

MEMBERS = Gauge("kubefly_gossip_members", "Members known to this agent, by state", ["state"])
ROWS = Gauge("kubefly_gossip_rows", "Rows in the local replica", ["kind"])
MESSAGES = Counter("kubefly_gossip_messages_total", "Gossip messages", ["direction", "type"])
BYTES = Counter("kubefly_gossip_bytes_total", "Gossip bytes (UDP and TCP)", ["direction"])
REJECTED = Counter("kubefly_gossip_rejected_total", "Messages or records refused", ["reason"])
BACKLOG = Gauge("kubefly_gossip_own_backlog", "This host's changed rows waiting for their first push (paced)")
LAG = Histogram("kubefly_gossip_propagation_lag_seconds", "From a row's write at its origin to its merge here",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
# Sync connections served at once (a peer syncs every ~2 s, so a few at a time is normal).
MAX_SYNC_CONNS = 32


@dataclass
class AgentConfig:
    host: str
    region: str
    bind_ip: str = "127.0.0.1"
    advertise_ip: str = ""
    gossip_port: int = 7946
    seeds: list[tuple[str, int]] = field(default_factory=list)
    data_dir: Path | None = None
    tombstone_ttl: float = 3600.0
    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_probes: int = 3
    suspicion_mult: float = 4.0
    origin_fanout: int = 100  # peers an origin pushes its own new rows to directly
    fanout: int = 3  # peers per relay round
    rounds: int = 2
    gossip_interval: float = 0.05
    sync_interval: float = 2.0
    load_interval: float = 1.0
    origin_rate: float = 100.0  # new record versions per second per origin
    origin_burst: float = 500.0
    sender_rate: float = 500.0  # datagrams per second per sender
    sender_burst: float = 1000.0
    queue_size: int = 4096
    max_rows_per_origin: int = 10_000
    emulate_latency: tuple[float, float] = (0.0, 0.0)  # one-way seconds: same region, other region


class TokenBuckets:
    """Per-key token buckets; the key set is bounded so unknown names cannot grow it forever."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000):
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._b: dict[str, list[float]] = {}

    def take(self, key: str, n: int, now: float | None = None) -> int:
        """Up to n tokens at once; returns how many were granted."""
        granted = 0
        while granted < n and self.allow(key, now):
            granted += 1
        return granted

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        b = self._b.get(key)
        if b is None:
            if len(self._b) >= self.max_keys:
                self._b.pop(next(iter(self._b)))
            b = self._b[key] = [self.burst, now]
        b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True
        return False


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, agent: "Agent"):
        self.agent = agent

    def datagram_received(self, data: bytes, addr) -> None:
        BYTES.labels("in").inc(len(data))
        try:
            self.agent._inbox.put_nowait((data, addr))
        except asyncio.QueueFull:
            REJECTED.labels("queue_full").inc()

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error", error=str(exc))


class Agent:
    def __init__(self, cfg: AgentConfig, keys: Keys):
        cfg.advertise_ip = cfg.advertise_ip or cfg.bind_ip
        self.cfg, self.keys = cfg, keys
        self.store = Store(cfg.data_dir / "agent.db" if cfg.data_dir else None, cfg.tombstone_ttl)
        self.hlc = hlcmod.HLC()
        self.members = Membership(
            Member(cfg.host, cfg.advertise_ip, cfg.gossip_port, cfg.region),
            probe_interval=cfg.probe_interval, suspicion_mult=cfg.suspicion_mult, on_change=self._member_changed,
        )
        self.view: dict[Key, tuple[int, str, Instance]] = {}  # key -> (hlc, origin, winning row)
        self._key_origins: dict[Key, set[str]] = {}
        self.local: dict[Key, LocalMachine] = {}
        # Whether this host's machines are known (the source delivered, or a set was
        # persisted): until then a peer's copy of one of our rows cannot be refuted.
        self.local_known = False
        self._checks: dict[Key, tuple[tuple, MachineChecks]] = {}
        # Told each local machine's check verdict when it changes (PodSource writes the pod's readiness gate).
        self.on_checks: Callable[[LocalMachine, bool, list[str]], None] | None = None
        self._told_checks: dict[Key, tuple[str, bool]] = {}
        # Told at each reconcile that a machine without checks is published started, with its address
        # (PodSource writes the pod's routed gate, unless its pod already passed it: Ready means routable).
        self.on_published: Callable[[LocalMachine], None] | None = None
        self.loads: dict[Key, int] = {}
        self._loads_dirty = False
        self._watchers: set[asyncio.Queue] = set()
        # (origin, key) -> [wire record, rounds left, first push goes to origin_fanout peers]
        self._bcast: dict[tuple[str, Key], list] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last_flush = 0.0
        self._acks: dict[int, asyncio.Future] = {}
        self._relays: dict[int, tuple[tuple[str, int], int]] = {}
        self._seq = random.randrange(1 << 30)
        self._inbox: asyncio.Queue = asyncio.Queue(cfg.queue_size)
        self._origin_limit = TokenBuckets(cfg.origin_rate, cfg.origin_burst)
        self._sender_limit = TokenBuckets(cfg.sender_rate, cfg.sender_burst)
        self._sync_limit = TokenBuckets(2.0, 6.0)
        self._sync_conns = 0  # sync connections being served
        # Our own pushes stay under what receivers accept from one origin; rows that
        # change again while waiting are coalesced (the queue is keyed by row).
        self._own_pace = TokenBuckets(cfg.origin_rate * 0.8, cfg.origin_burst * 0.8)
        self.dropped: set[str] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._reconcile_pending = False
        self._rtt_published: dict[str, float] = {}

    # == lifecycle ===============================================================
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        highest = 0
        for rec in self.store.load():
            highest = max(highest, rec.hlc)
            self._index(rec.origin, rec.key)
        self.hlc.last = max(highest, int(self.store.meta_get("hlc") or 0))
        self.members.me.inc = int(self.store.meta_get("incarnation") or 0) + 1
        self.store.meta_set("incarnation", str(self.members.me.inc))
        persisted = self.store.meta_get("local_machines")
        self.local_known = persisted is not None
        for raw in json.loads(persisted or "[]"):
            m = LocalMachine.from_json(raw, self.cfg.region)
            self.local[m.key] = m
        for key in list(self._key_origins):
            self._recompute(key)
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(self.cfg.bind_ip, self.cfg.gossip_port))
        try:  # room for bursts while the process is not scheduled (the kernel may cap it)
            self._transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        except OSError:
            pass
        self._tcp = await asyncio.start_server(self._serve_sync, self.cfg.bind_ip, self.cfg.gossip_port)
        self.members.announce()
        self._tasks = [asyncio.create_task(c) for c in (
            self._dispatch_loop(), self._probe_loop(), self._sync_loop(), self._maintenance_loop(), self._load_loop())]
        self._reconcile()
        await self._join()
        log.info("agent started", host=self.cfg.host, region=self.cfg.region, gossip_port=self.cfg.gossip_port,
                 incarnation=self.members.me.inc, rows=self.store.count())

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for _, mc in self._checks.values():
            mc.cancel()
        for q in list(self._watchers):
            self._close_watcher(q)
        if self._tcp is not None:
            self._tcp.close()
        if self._transport is not None:
            self._transport.close()
        self.store.meta_set("hlc", str(self.hlc.last))
        self.store.close()

    # == local rows ===============================================================
    def set_local(self, machines: dict[Key, LocalMachine]) -> None:
        """The complete set of machines on this host, from the source."""
        if not self.local_known:
            log.info("machines of this host known", machines=len(machines))
        self.local = dict(machines)
        self.local_known = True
        self.store.meta_set("local_machines", json.dumps([m.to_json() for m in self.local.values()]))
        self._reconcile()

    def report_loads(self, loads: dict[Key, int]) -> list[Key]:
        """Loads for this host's machines; returns the keys refused (not on this host)."""
        refused = [k for k in loads if k not in self.local]
        for k, v in loads.items():
            if k in self.local and self.loads.get(k) != v:
                self.loads[k] = v
                self._loads_dirty = True
        return refused

    def _reconcile_soon(self) -> None:
        if not self._reconcile_pending:
            self._reconcile_pending = True
            asyncio.get_running_loop().call_soon(self._reconcile)

    def _reconcile(self) -> None:
        self._reconcile_pending = False
        for key, m in self.local.items():
            self._ensure_checks(m)
            self._tell_checks(m)
            row = self._compose(m)
            cur = self.store.get(self.cfg.host, key)
            if cur is None or cur.row != row:
                self._write(key, row)
            self._tell_published(m)
        for key, (_, mc) in list(self._checks.items()):
            if key not in self.local:
                mc.cancel()
                del self._checks[key]
        for key in [k for k in self._told_checks if k not in self.local]:
            del self._told_checks[key]
        for rec in self.store.records_of(self.cfg.host):
            if rec.key not in self.local and rec.row is not None:
                self.loads.pop(rec.key, None)
                self._write(rec.key, None)

    def _ensure_checks(self, m: LocalMachine) -> None:
        want = (m.address, m.checks) if (m.state == InstanceState.started.value and m.address and m.checks) else None
        have = self._checks.get(m.key)
        if have is not None and have[0] == want:
            return
        if have is not None:
            have[1].cancel()
            del self._checks[m.key]
        if want is not None:
            self._checks[m.key] = (want, MachineChecks(m.address, list(m.checks), self._reconcile_soon))

    def _tell_checks(self, m: LocalMachine) -> None:
        """Pass a settled verdict (every check has a result) of this instance on, once per change."""
        have = self._checks.get(m.key)
        if self.on_checks is None or have is None or have[1].status == "unknown":
            return
        verdict = (m.instance_id, have[1].status == "passing")
        if self._told_checks.get(m.key) != verdict:
            self._told_checks[m.key] = verdict
            self.on_checks(m, verdict[1], have[1].failing())

    def _tell_published(self, m: LocalMachine) -> None:
        """After its row is written and queued: a machine with checks is told through its verdict."""
        if self.on_published is not None and not m.checks and m.state == InstanceState.started.value and m.address:
            self.on_published(m)

    def _compose(self, m: LocalMachine) -> dict:
        if not m.checks:
            status = "passing"
        else:
            have = self._checks.get(m.key)
            status = have[1].status if have is not None else "unknown"
        inst = Instance(org=m.org, app=m.app, machine_id=m.machine_id, instance_id=m.instance_id, region=m.region,
                        host=self.cfg.host, address=m.address, state=m.state, check_status=status,
                        load=self.loads.get(m.key, 0), services=list(m.services))
        return inst.model_dump(mode="json")

    def _write(self, key: Key, row: dict | None) -> None:
        rec = sign_record(self.keys, self.cfg.host, self.hlc.now(), key, row)
        self.store.put(rec, Instance.model_validate(row) if row is not None else None)
        self._index(rec.origin, key)
        self._recompute(key)
        self._enqueue(rec, direct=True)

    # == the reader-facing view ===================================================
    def _index(self, origin: str, key: Key) -> None:
        self._key_origins.setdefault(key, set()).add(origin)

    def _recompute(self, key: Key) -> None:
        best: tuple[int, str, Instance] | None = None
        for origin in list(self._key_origins.get(key, ())):
            rec = self.store.get(origin, key)
            if rec is None:
                self._key_origins[key].discard(origin)
                continue
            inst = self.store.instance(origin, key)
            if inst is not None and self.members.is_live(origin) and (best is None or rec.hlc > best[0]):
                best = (rec.hlc, origin, inst)
        if not self._key_origins.get(key):
            self._key_origins.pop(key, None)
        old = self.view.get(key)
        if best is None:
            if old is not None:
                del self.view[key]
                self._emit({"type": "delete", "org": key[0], "machine_id": key[1], "at": time.time()})
        elif old is None or old[:2] != best[:2]:
            self.view[key] = best
            if self._watchers and (old is None or old[2] != best[2]):  # a refresh changes nothing
                self._emit({"type": "upsert", "instance": best[2].model_dump(mode="json"), "v": best[0],
                            "at": time.time()})

    def _member_changed(self, m: Member, old: str) -> None:
        if old == DEAD and m.rtt is None and self._transport is not None:
            # First contact: measure RTT now rather than when round-robin probing gets there.
            asyncio.get_running_loop().call_later(random.uniform(0, 1.0), self._measure, m)
        if (old == DEAD) != (m.state == DEAD):
            log.info("member state", member=m.host, state=m.state, was=old, incarnation=m.inc)
            for key in list(self.store.by_origin.get(m.host, {})):
                self._recompute(key)
            if old == DEAD and self._transport is not None and m.host not in self.dropped:
                # Met (again): exchange rows now, not at the next random sync. A host that
                # just booted wrote its rows while it knew no peer (no push reached anyone).
                asyncio.get_running_loop().create_task(self._sync_with(m.addr, m.host))
        elif m.state == SUSPECT:
            log.info("member suspect", member=m.host, incarnation=m.inc)

    def instances(self, org: str | None = None, app: str | None = None) -> list[Instance]:
        return [i for _, _, i in self.view.values() if (org is None or i.org == org) and (app is None or i.app == app)]

    def rtts(self) -> dict[str, float]:
        return {m.host: m.rtt for m in self.members.alive() if m.rtt is not None}

    def snapshot(self) -> dict:
        return {"type": "snapshot", "self": {"host": self.cfg.host, "region": self.cfg.region},
                "instances": [i.model_dump(mode="json") for i in self.instances()], "rtt": self.rtts()}

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(10_000)
        self._watchers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._watchers.discard(q)

    def _close_watcher(self, q: asyncio.Queue) -> None:
        self._watchers.discard(q)
        while not q.empty():
            q.get_nowait()
        q.put_nowait(None)  # tells the stream to end; the client reconnects and gets a snapshot

    def _emit(self, doc: dict) -> None:
        for q in list(self._watchers):
            try:
                q.put_nowait(doc)
            except asyncio.QueueFull:
                self._close_watcher(q)

    # == receiving ==================================================================
    async def _dispatch_loop(self) -> None:
        while True:
            data, addr = await self._inbox.get()
            try:
                self._handle(data, addr)
            except WireError as exc:
                REJECTED.labels(exc.reason).inc()
                log.debug("datagram rejected", reason=exc.reason, peer=f"{addr[0]}:{addr[1]}")
            except Exception:  # a bug must not kill the receive loop
                REJECTED.labels("error").inc()
                log.exception("datagram handling failed")

    def _handle(self, data: bytes, addr) -> None:
        msg = decode_dgram(self.keys, data)
        sender, kind = msg["f"], msg["t"]
        if sender in self.dropped or sender == self.cfg.host:
            return
        if not self._sender_limit.allow(sender):
            raise WireError("rate_limited")
        if kind not in ("ping", "ack", "preq", "g"):
            raise WireError("malformed", f"type {kind!r}")
        MESSAGES.labels("in", kind).inc()
        self._learn_sender(sender, msg.get("me"), addr)
        for u in msg.get("m") or ():
            u = parse_update(u)
            if u is None:
                raise WireError("malformed", "member update")
            self.members.apply(u)
        seq = msg.get("seq")
        if kind == "ping":
            self._send_to(addr, sender, {"t": "ack", "seq": seq})
        elif kind == "ack":
            fut = self._acks.get(seq) if isinstance(seq, int) else None
            if fut is not None and not fut.done():
                fut.set_result(time.monotonic())
        elif kind == "preq":
            self._relay_probe(msg, addr, sender)
        elif kind == "g":
            records = msg.get("r") or []
            if not isinstance(records, list):
                raise WireError("malformed", "records")
            for wire in records:
                self._ingest(wire)

    def _learn_sender(self, sender: str, me: object, addr) -> None:
        if not (isinstance(me, list) and len(me) == 3):
            return
        port, region, inc = me
        known = self.members.members.get(sender)
        u = parse_update([sender, addr[0], port, region, inc, ALIVE])
        if u is None:
            return
        if known is not None and known.state == DEAD and inc <= known.inc:
            # It does not know it was declared dead: tell it, so it refutes.
            self._send_to(addr, sender, {"t": "g", "r": [], "m": [known.update()]})
            return
        self.members.apply(u)

    def _relay_probe(self, msg: dict, addr, requester: str) -> None:
        target = self.members.members.get(msg.get("target"))
        if target is None or target.host in self.dropped:
            return
        mine = self._next_seq()
        self._relays[mine] = (addr, msg.get("seq"))
        fut = asyncio.get_running_loop().create_future()
        self._acks[mine] = fut

        def done(_f) -> None:
            self._acks.pop(mine, None)
            back, their = self._relays.pop(mine, (None, None))
            if not fut.cancelled() and back is not None:
                self._send_to(back, requester, {"t": "ack", "seq": their})

        fut.add_done_callback(done)
        asyncio.get_running_loop().call_later(self.cfg.probe_interval, fut.cancel)
        self._send_to(target.addr, target.host, {"t": "ping", "seq": mine})

    def _ingest(self, wire: object, pushed: bool = True) -> bool:
        """Merge one received record if it is new, authentic, valid and within its origin's limits.

        Pushed records are rate-limited per origin; anti-entropy is bounded otherwise
        (one version per row per sync, syncs rate-limited per peer, rows capped per origin)
        so a throttled origin still converges once its pushes were refused."""
        try:
            if not (isinstance(wire, list) and len(wire) == 2 and isinstance(wire[0], str)):
                raise WireError("malformed", "record")
            head = json.loads(wire[0])
            origin, h, key = head["o"], head["h"], head["k"]
            cur = self.store.get(origin, (key[0], key[1]))
            if cur is not None and isinstance(h, int) and h <= cur.hlc:
                if h == cur.hlc:
                    self._lose_interest(cur)
                return False  # a duplicate or an older version: the common case, kept cheap
            if pushed and not self._origin_limit.allow(origin):
                raise WireError("rate_limited", origin)
            if cur is None and len(self.store.by_origin.get(origin, ())) >= self.cfg.max_rows_per_origin:
                raise WireError("too_many_rows", origin)
            rec = verify_record(self.keys, wire, parsed=head)
            if rec.origin == self.cfg.host:
                self._refute(rec)
                return False
            inst = validate(rec, time.time(), self.store.ttl)
            self.hlc.observe(rec.hlc)
        except WireError as exc:
            REJECTED.labels(exc.reason).inc()
            log.debug("record rejected", reason=exc.reason, detail=str(exc)[:200])
            return False
        except (ValueError, KeyError, TypeError, IndexError):
            REJECTED.labels("malformed").inc()
            return False
        self.store.put(rec, inst)
        self._index(rec.origin, rec.key)
        self._recompute(rec.key)
        if pushed:
            self._enqueue(rec)
            LAG.observe(max(0.0, time.time() - hlcmod.wall_s(rec.hlc)))
        # Rows pulled by anti-entropy are not pushed on: that would let a sync carry
        # an origin's backlog past its pace, and each peer runs its own syncs anyway.
        return True

    def _lose_interest(self, rec: Record) -> None:
        # Rumour mongering with feedback: a peer that already had it means the
        # rumour is spreading without us, so push it for one round less.
        entry = self._bcast.get((rec.origin, rec.key))
        if entry is not None and entry[0][0] == rec.body:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._bcast[(rec.origin, rec.key)]

    def _refute(self, rec: Record) -> None:
        """A peer holds a version of one of our rows newer than ours (our store was lost):
        move our clock past it and re-assert what this host really has."""
        cur = self.store.get(self.cfg.host, rec.key)
        if cur is not None and rec.hlc <= cur.hlc:
            return
        self.hlc.observe(rec.hlc)
        if not self.local_known:
            # Restarted without state and the source has not answered yet (a host that
            # boots reaches the API late): keep our last word as peers hold it rather
            # than deny every machine here; the first set from the source settles it.
            self.store.put(rec)
            self._index(rec.origin, rec.key)
            self._recompute(rec.key)
            return
        REJECTED.labels("own_origin").inc()
        m = self.local.get(rec.key)
        self._write(rec.key, self._compose(m) if m is not None else None)

    # == sending ====================================================================
    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        return self._seq

    def _send_to(self, addr: tuple[str, int], host: str | None, msg: dict) -> None:
        if self._transport is None or (host is not None and host in self.dropped):
            return
        msg["f"] = self.cfg.host
        msg["me"] = [self.cfg.gossip_port, self.cfg.region, self.members.me.inc]
        msg.setdefault("m", self.members.take_updates())
        data = encode_dgram(self.keys, msg)
        self._sendraw(data, addr, host, msg["t"])

    def _sendraw(self, data: bytes, addr: tuple[str, int], host: str | None, kind: str) -> None:
        MESSAGES.labels("out", kind).inc()
        BYTES.labels("out").inc(len(data))
        same, cross = self.cfg.emulate_latency
        if same or cross:
            peer = self.members.members.get(host) if host else None
            delay = (same if peer is None or peer.region == self.cfg.region else cross) * random.uniform(0.9, 1.1)
            asyncio.get_running_loop().call_later(delay, self._transport.sendto, data, addr)
        else:
            self._transport.sendto(data, addr)

    def _enqueue(self, rec: Record, direct: bool = False) -> None:
        self._bcast[(rec.origin, rec.key)] = [rec.wire, self.cfg.rounds, direct]
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None or not self._bcast:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.001, self._last_flush + self.cfg.gossip_interval - loop.time())
        self._flush_handle = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        """One push round. An origin's new rows go straight to up to `origin_fanout`
        peers (one hop for most of the cluster); every record, ours or relayed, then
        goes to `fanout` random peers for `rounds` rounds (fewer when peers show
        they already have it), so losses and the members beyond the direct
        fan-out are covered within a few hops."""
        self._flush_handle = None
        self._last_flush = asyncio.get_running_loop().time()
        waiting = [e for e in self._bcast.values() if e[2]]
        direct = waiting[: self._own_pace.take("own", len(waiting))]
        BACKLOG.set(len(waiting) - len(direct))
        if direct:
            peers = [m for m in self.members.random_alive(self.cfg.origin_fanout) if m.host not in self.dropped]
            for e in direct:
                e[2] = False
            self._send_packed([e[0] for e in direct], peers)
        first = {id(e) for e in direct}
        relay = [e for e in self._bcast.values() if not e[2] and id(e) not in first]
        peers = [m for m in self.members.random_alive(self.cfg.fanout + len(self.dropped)) if m.host not in self.dropped]
        self._send_packed([e[0] for e in relay], peers[: self.cfg.fanout])
        for k, e in list(self._bcast.items()):
            if e[2]:
                continue  # still waiting for its first push
            e[1] -= 1
            if e[1] <= 0:
                del self._bcast[k]
        self._schedule_flush()

    def _send_packed(self, wires: list, peers: list[Member]) -> None:
        batch, size = [], 0
        for wire in wires:
            n = len(wire[0]) + len(wire[1]) + 16
            if batch and size + n > MAX_DATAGRAM - 512:
                self._send_batch(batch, peers)
                batch, size = [], 0
            batch.append(wire)
            size += n
        if batch:
            self._send_batch(batch, peers)

    def _send_batch(self, batch: list, peers: list[Member]) -> None:
        if not peers or self._transport is None:
            return
        msg = {"t": "g", "f": self.cfg.host, "me": [self.cfg.gossip_port, self.cfg.region, self.members.me.inc],
               "r": batch, "m": self.members.take_updates(4)}
        data = encode_dgram(self.keys, msg)
        for p in peers:
            self._sendraw(data, p.addr, p.host, "g")

    async def _seed_addrs(self) -> list[tuple[str, int]]:
        """Seeds may be names (a headless Service lists every agent): resolve them each time."""
        loop = asyncio.get_running_loop()
        me = (self.cfg.advertise_ip, self.cfg.gossip_port)
        family = socket.AF_INET6 if ":" in self.cfg.bind_ip else socket.AF_INET  # our socket's family
        out: set[tuple[str, int]] = set()
        for host, port in self.cfg.seeds:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, family=family)
            except OSError as exc:
                log.warning("seed does not resolve", seed=f"{host}:{port}", error=str(exc))
                continue
            out.update((info[4][0], info[4][1]) for info in infos)
        out.discard(me)
        return sorted(out)

    async def _join(self) -> None:
        """Introduce ourselves to the seeds and pull the cluster's state from one of them."""
        addrs = await self._seed_addrs()
        for addr in addrs:
            self._send_to(addr, None, {"t": "ping", "seq": self._next_seq()})
        if addrs:
            await self._sync_with(random.choice(addrs), None)

    # == failure detection ===========================================================
    async def _probe_loop(self) -> None:
        while True:
            target = self.members.next_probe_target()
            if target is not None:
                asyncio.create_task(self._probe(target))
            dead = [m for m in self.members.dead() if m.host not in self.dropped]
            if dead:
                # One datagram a round to a member we think dead: a host that comes back is met
                # within a probe interval, also when it cannot resolve its seeds yet (a booting
                # host's cluster DNS), instead of when a random sync happens to pick it.
                peer = random.choice(dead)
                self._send_to(peer.addr, peer.host, {"t": "ping", "seq": self._next_seq()})
            self.members.tick()
            await asyncio.sleep(self.cfg.probe_interval * random.uniform(0.9, 1.1))

    def _measure(self, m: Member) -> None:
        seq = self._next_seq()
        fut = asyncio.get_running_loop().create_future()
        self._acks[seq] = fut
        sent = time.monotonic()

        def done(f: asyncio.Future) -> None:
            self._acks.pop(seq, None)
            if not f.cancelled():
                self.members.record_rtt(m.host, f.result() - sent)

        fut.add_done_callback(done)
        asyncio.get_running_loop().call_later(self.cfg.probe_interval, fut.cancel)
        self._send_to(m.addr, m.host, {"t": "ping", "seq": seq})

    async def _probe(self, target: Member) -> None:
        loop = asyncio.get_running_loop()
        seq = self._next_seq()
        fut = loop.create_future()
        self._acks[seq] = fut
        sent = time.monotonic()
        try:
            self._send_to(target.addr, target.host, {"t": "ping", "seq": seq})
            try:
                got = await asyncio.wait_for(asyncio.shield(fut), self.cfg.probe_timeout)
                self.members.record_rtt(target.host, got - sent)
                return
            except asyncio.TimeoutError:
                pass
            for helper in self.members.random_alive(self.cfg.indirect_probes, exclude={target.host}):
                self._send_to(helper.addr, helper.host, {"t": "preq", "seq": seq, "target": target.host})
            try:
                await asyncio.wait_for(fut, max(0.05, self.cfg.probe_interval - self.cfg.probe_timeout))
            except asyncio.TimeoutError:
                self.members.suspect(target.host)
        finally:
            self._acks.pop(seq, None)

    # == anti-entropy ==================================================================
    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sync_interval * random.uniform(0.5, 1.5))
            try:
                await self._sync_round()
            except Exception as exc:  # one bad exchange must not end anti-entropy for good
                REJECTED.labels("error").inc()
                log.warning("sync round failed", error=repr(exc)[:300])

    async def _sync_round(self) -> None:
        alive = [m for m in self.members.alive() if m.host not in self.dropped]
        dead = [m for m in self.members.dead() if m.host not in self.dropped]
        if dead and (not alive or random.random() < 0.25):
            peer = random.choice(dead)  # how a healed partition or a restarted host is found again
            await self._sync_with(peer.addr, peer.host)
        elif alive:
            peer = random.choice(alive)
            await self._sync_with(peer.addr, peer.host)
        elif self.cfg.seeds:
            await self._join()

    def _sync_members(self, updates: object) -> None:
        for u in updates if isinstance(updates, list) else ():
            u = parse_update(u)
            if u is None:
                continue
            if u[5] == DEAD and u[0] != self.cfg.host:
                # A full list may be stale: a death we did not witness is only a suspicion.
                u = u[:5] + [SUSPECT]
            self.members.apply(u)

    def _records_for(self, origins) -> list:
        return [r.wire for o in origins for r in self.store.records_of(o)]

    def _differs(self, theirs: dict) -> tuple[list[str], list[str]]:
        mine = self.store.digest()
        send = [o for o, d in mine.items() if theirs.get(o) != d]
        want = [o for o, d in theirs.items() if mine.get(o) != d]
        return send, want

    async def _sync_with(self, addr: tuple[str, int], host: str | None) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), 2.0)
        except (OSError, asyncio.TimeoutError):
            return
        try:
            n = await write_frame(self.keys, writer, {"t": "sync", "f": self.cfg.host,
                                                      "members": self.members.all_updates(),
                                                      "digest": self.store.digest()})
            BYTES.labels("out").inc(n)
            MESSAGES.labels("out", "sync").inc()
            resp, n = await asyncio.wait_for(read_frame(self.keys, reader), 5.0)
            BYTES.labels("in").inc(n)
            if resp["f"] in self.dropped:
                return
            self._sync_members(resp.get("members"))
            for wire in resp.get("records") or []:
                self._ingest(wire, pushed=False)
            want = [o for o in resp.get("want") or [] if isinstance(o, str)]
            n = await write_frame(self.keys, writer, {"t": "push", "f": self.cfg.host,
                                                      "records": self._records_for(want)})
            BYTES.labels("out").inc(n)
        except WireError as exc:
            REJECTED.labels(exc.reason).inc()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, KeyError, TypeError, AttributeError):
            pass
        finally:
            writer.close()

    async def _serve_sync(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._sync_conns >= MAX_SYNC_CONNS:  # each may buffer a hello frame: memory stays bounded
            REJECTED.labels("sync_conns").inc()
            writer.close()
            return
        self._sync_conns += 1
        try:
            msg, n = await asyncio.wait_for(read_frame(self.keys, reader, HELLO_FRAME), 5.0)
            BYTES.labels("in").inc(n)
            MESSAGES.labels("in", "sync").inc()
            peer = msg["f"]
            if peer in self.dropped:
                return
            if not self._sync_limit.allow(peer):
                raise WireError("sync_limited")
            self._sync_members(msg.get("members"))
            theirs = msg.get("digest")
            if not isinstance(theirs, dict):
                raise WireError("malformed", "digest")
            send, want = self._differs(theirs)
            n = await write_frame(self.keys, writer, {"t": "syncr", "f": self.cfg.host,
                                                      "members": self.members.all_updates(),
                                                      "records": self._records_for(send), "want": want})
            BYTES.labels("out").inc(n)
            if want:
                push, n = await asyncio.wait_for(read_frame(self.keys, reader), 5.0)
                BYTES.labels("in").inc(n)
                for wire in push.get("records") or []:
                    self._ingest(wire, pushed=False)
        except WireError as exc:
            REJECTED.labels(exc.reason).inc()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, KeyError, TypeError, AttributeError):
            pass
        finally:
            self._sync_conns -= 1
            writer.close()

    # == housekeeping ===================================================================
    async def _load_loop(self) -> None:
        # Loads change at request speed; rows carry them at most once per interval.
        while True:
            await asyncio.sleep(self.cfg.load_interval)
            if self._loads_dirty:
                self._loads_dirty = False
                self._reconcile()

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for rec in self.store.expired(now, keep_live_of=self.cfg.host):
                self.store.remove(rec.origin, rec.key)
                self._recompute(rec.key)
            for rec in self.store.needs_refresh(self.cfg.host, now):
                self._write(rec.key, rec.row)
            self.store.flush()
            self.store.meta_set("hlc", str(self.hlc.last))
            rtts = self.rtts()
            changed = {h: v for h, v in rtts.items()
                       if abs(v - self._rtt_published.get(h, -1.0)) > max(0.0005, 0.1 * v)}
            if changed:
                self._rtt_published.update(changed)
                self._emit({"type": "rtt", "rtt": changed})
            states = {ALIVE: 0, SUSPECT: 0, DEAD: 0}
            for m in self.members.members.values():
                states[m.state] += 1
            states[ALIVE] += 1
            for s, v in states.items():
                MEMBERS.labels(s).set(v)
            live = self.store.live_count()
            ROWS.labels("live").set(live)
            ROWS.labels("tombstone").set(self.store.count() - live)
            ROWS.labels("view").set(len(self.view))
            if not self.members.alive() and self.cfg.seeds:
                await self._join()
