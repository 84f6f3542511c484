"""Read the local agent's replica from another process (proxy, DNS).

`ReplicaClient` fetches a snapshot from the agent's loopback API, then follows
`GET /v1/watch` (NDJSON) in the background. Reads are served from memory and
never wait on the network: if the agent goes away the last known state stays
and the client reconnects with backoff, replacing its state with the next
snapshot.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from kubefly import logs
from kubefly.instances import Instance

log = logs.get("kubefly.gossip.client")

Key = tuple[str, str]  # (org, machine_id)


@dataclass(frozen=True)
class Change:
    """One change of the replica, as delivered to subscribers.

    kind: "snapshot" (the whole state was replaced), "upsert" (instance set),
    "delete" (key set, instance is the last known row), "rtt" (rtt set).
    """

    kind: str
    instance: Instance | None = None
    key: Key | None = None
    rtt: dict[str, float] = field(default_factory=dict)


class LocalReplica:
    """The in-memory copy of the agent's routable view, indexed by app."""

    def __init__(self) -> None:
        self.self_host = ""
        self.self_region = ""
        self._rows: dict[Key, Instance] = {}
        self._by_app: dict[Key, dict[str, Instance]] = {}
        self._rtt: dict[str, float] = {}
        self._host_ips: dict[str, str] = {}  # member host -> the IP its agent advertises
        self._subscribers: list[asyncio.Queue] = []
        self._changed = asyncio.Event()

    # -- reads ---------------------------------------------------------------
    def instances(self, org: str | None = None, app: str | None = None) -> list[Instance]:
        if org is not None and app is not None:
            return list(self._by_app.get((org, app), {}).values())
        return [
            i for i in self._rows.values()
            if (org is None or i.org == org) and (app is None or i.app == app)
        ]

    def apps(self) -> set[tuple[str, str]]:
        return set(self._by_app)

    def rtt(self, host: str) -> float | None:
        if host == self.self_host:
            return 0.0
        return self._rtt.get(host)

    def host_ip(self, host: str) -> str | None:
        """The IP other hosts reach `host` on (its agent's advertised member address)."""
        return self._host_ips.get(host)

    def subscribe(self, maxsize: int = 10_000) -> asyncio.Queue:
        """A queue of `Change`s. A subscriber that falls behind by `maxsize`
        changes gets a single "snapshot" change instead and should re-read."""
        q: asyncio.Queue = asyncio.Queue(maxsize)
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        if q in self._subscribers:
            self._subscribers.remove(q)

    async def wait_for(self, predicate: Callable[["LocalReplica"], bool], timeout: float) -> bool:
        """Wait until predicate(self) is true; False on timeout (never raises)."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return True

    # -- writes (from the watch stream) -------------------------------------
    def apply_snapshot(self, doc: dict) -> None:
        me = doc.get("self") or {}
        self.self_host = me.get("host", self.self_host)
        self.self_region = me.get("region", self.self_region)
        self._rows = {}
        self._by_app = {}
        for raw in doc.get("instances", []):
            self._put(Instance.model_validate(raw))
        self._rtt = {h: float(v) for h, v in (doc.get("rtt") or {}).items()}
        self._publish(Change("snapshot"))

    def apply_line(self, doc: dict) -> None:
        kind = doc.get("type")
        if kind == "snapshot":
            self.apply_snapshot(doc)
        elif kind == "upsert":
            inst = Instance.model_validate(doc["instance"])
            self._put(inst)
            self._publish(Change("upsert", instance=inst, key=inst.key))
        elif kind == "delete":
            key = (doc["org"], doc["machine_id"])
            old = self._pop(key)
            if old is not None:
                self._publish(Change("delete", instance=old, key=key))
        elif kind == "rtt":
            self._rtt.update({h: float(v) for h, v in doc.get("rtt", {}).items()})
            self._publish(Change("rtt", rtt=dict(doc.get("rtt", {}))))

    def apply_members(self, doc: dict) -> None:
        """GET /v1/members: keep each member's advertised IP."""
        ips = {}
        for m in doc.get("members", []):
            ip = str(m.get("addr", "")).rpartition(":")[0].strip("[]")
            if m.get("host") and ip:
                ips[str(m["host"])] = ip
        self._host_ips = ips

    def _put(self, inst: Instance) -> None:
        old = self._rows.get(inst.key)
        if old is not None and old.app != inst.app:
            self._pop(inst.key)
        self._rows[inst.key] = inst
        self._by_app.setdefault((inst.org, inst.app), {})[inst.machine_id] = inst

    def _pop(self, key: Key) -> Instance | None:
        old = self._rows.pop(key, None)
        if old is not None:
            bucket = self._by_app.get((old.org, old.app))
            if bucket is not None:
                bucket.pop(old.machine_id, None)
                if not bucket:
                    del self._by_app[(old.org, old.app)]
        return old

    def _publish(self, change: Change) -> None:
        self._changed.set()
        for q in self._subscribers:
            try:
                q.put_nowait(change)
            except asyncio.QueueFull:
                # A slow subscriber loses detail, not correctness: it is told to re-read.
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(Change("snapshot"))


class ReplicaClient:
    """Follows one agent. `members_interval` (seconds) also polls `GET /v1/members`
    for `replica.host_ip()`; only a reader that hops to other hosts (the proxy)
    needs it, so by default (None) nothing is polled and `host_ip()` knows no host."""

    def __init__(self, base_url: str, *, connect_timeout: float = 5.0, members_interval: float | None = None,
                 load_token: str = ""):
        if members_interval is not None and members_interval <= 0:
            raise ValueError(f"members_interval must be a positive number of seconds or None, got {members_interval}")
        self.base_url = base_url.rstrip("/")
        self._members_interval = members_interval
        self._members_task: asyncio.Task | None = None
        self.replica = LocalReplica()
        self.connected = False
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._first = asyncio.Event()
        self._last_refusal_log = -1e9
        self._load_headers = {"Authorization": f"Bearer {load_token}"} if load_token else {}

    async def start(self, wait: float = 10.0) -> None:
        """Start following the agent; returns once the first snapshot arrived
        (or after `wait` seconds with an empty replica if the agent is down)."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)
        )
        self._task = asyncio.create_task(self._follow())
        if self._members_interval is not None:
            self._members_task = asyncio.create_task(self._poll_members(self._members_interval))
        try:
            await asyncio.wait_for(self._first.wait(), wait)
        except asyncio.TimeoutError:
            log.warning("agent not reachable yet; serving an empty replica", agent=self.base_url)

    async def close(self) -> None:
        for task in (self._task, self._members_task):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self._session is not None:
            await self._session.close()

    async def report_load(self, loads: dict[tuple[str, str], int]) -> None:
        """Report current concurrency of instances on this host: {(org, machine_id): load}.
        Keys of other hosts' instances are refused by the agent, the rest applied.
        Best effort: a missing agent is logged, never raised to the caller."""
        if not loads or self._session is None:
            return
        body = {"loads": [{"org": o, "machine_id": m, "load": int(v)} for (o, m), v in loads.items()]}
        try:
            async with self._session.post(
                f"{self.base_url}/v1/load", json=body, headers=self._load_headers, timeout=aiohttp.ClientTimeout(total=2)
            ) as resp:
                if resp.status >= 400 and time.monotonic() - self._last_refusal_log > 60:
                    # Rows of other hosts are refused (the rest is applied); say so once a minute.
                    self._last_refusal_log = time.monotonic()
                    log.warning("load report refused", status=resp.status, body=(await resp.text())[:200])
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.debug("load report failed", error=str(exc))

    async def _poll_members(self, interval: float) -> None:
        """Member addresses (where each host's proxy is reached) change rarely: poll them."""
        assert self._session is not None
        while True:
            try:
                async with self._session.get(
                    f"{self.base_url}/v1/members", timeout=aiohttp.ClientTimeout(total=5)
                ) as resp:
                    resp.raise_for_status()
                    self.replica.apply_members(await resp.json())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the agent restarts or is gone: keep the last addresses
                log.debug("members poll failed", error=str(exc))
            await asyncio.sleep(interval)

    async def _follow(self) -> None:
        assert self._session is not None
        backoff = 0.1
        while True:
            try:
                async with self._session.get(f"{self.base_url}/v1/watch") as resp:
                    resp.raise_for_status()
                    backoff = 0.1
                    # Split lines ourselves: a snapshot of a big cluster is one line of
                    # megabytes, beyond aiohttp's readline limit.
                    buf, scanned = bytearray(), 0
                    async for chunk in resp.content.iter_any():
                        buf += chunk
                        start = 0
                        while (nl := buf.find(b"\n", scanned)) >= 0:
                            line = bytes(buf[start:nl])
                            start = scanned = nl + 1
                            if line.strip():
                                self.replica.apply_line(json.loads(line))
                        del buf[:start]
                        scanned = len(buf)
                        if not self.connected and self.replica.self_host:
                            self.connected = True
                            self._first.set()
                            log.info("following agent", agent=self.base_url)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the agent restarts or is gone: keep the last state
                if self.connected:
                    log.warning("agent stream lost; serving last known state", error=str(exc))
                self.connected = False
            await asyncio.sleep(backoff * (0.5 + random.random()))
            # The agent is on this host (loopback): retrying often costs nothing, and a proxy
            # that started before its agent (a host booting) must not lag it by seconds.
            backoff = min(backoff * 2, 1.0)
