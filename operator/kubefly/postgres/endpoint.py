"""`kubefly postgres endpoint`: a TCP forwarder to the one writable primary.

It polls every member's /health and forwards each new client connection to the
member decide.choose_primary names. When the choice changes, every session to
the previous member is cut, so clients never keep writing to a member that is
no longer the primary; while there is no choice, new clients wait (bounded)
for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import time
from dataclasses import dataclass

import aiohttp
from prometheus_client import Counter, Gauge

from kubefly import logs
from kubefly.postgres import decide

log = logs.get("kubefly.postgres.endpoint")

SWITCHES = Counter("kubefly_pg_endpoint_switches_total", "Times the endpoint's target changed")
SESSIONS = Gauge("kubefly_pg_endpoint_sessions", "Client sessions being forwarded")
REFUSED = Counter("kubefly_pg_endpoint_refused_total", "Clients closed because no primary appeared in time")


@dataclass(frozen=True)
class Target:
    name: str
    host: str  # where clients reach its postgres
    pg_port: int
    health_url: str

    @classmethod
    def parse(cls, spec: str) -> "Target":
        """`name=host:pgport:healthport`, like the member's --peer."""
        name, _, rest = spec.partition("=")
        host, pg_port, health_port = rest.rsplit(":", 2)
        host = host.strip("[]")
        hp = f"[{host}]" if ":" in host else host
        return cls(name, host, int(pg_port), f"http://{hp}:{health_port}/health")


class Endpoint:
    def __init__(self, members: list[Target], *, poll_interval_s: float = 0.2, fresh_s: float = 1.0,
                 fence_deadline_s: float = 5.0, connect_wait_s: float = 30.0) -> None:
        self.members = {m.name: m for m in members}
        self.poll_interval_s = poll_interval_s
        self.fresh_s = fresh_s
        self.fence_deadline_s = fence_deadline_s
        self.connect_wait_s = connect_wait_s
        self.views: dict[str, decide.View] = {m.name: decide.View() for m in members}
        self.target: str | None = None
        self.changed = asyncio.Event()
        self.sessions: dict[str, set[asyncio.Task]] = {m.name: set() for m in members}

    async def poll_forever(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(0.5, self.poll_interval_s * 2))
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                await asyncio.gather(*(self._poll(http, m) for m in self.members.values()))
                self._decide()
                await asyncio.sleep(self.poll_interval_s)

    async def _poll(self, http: aiohttp.ClientSession, member: Target) -> None:
        try:
            async with http.get(member.health_url) as resp:
                body = await resp.json()
            self.views[member.name] = decide.View(decide.Report.from_json(body), time.monotonic())
        except aiohttp.ClientConnectorError as exc:
            if getattr(exc.os_error, "errno", None) == errno.ECONNREFUSED:
                # Nothing listens: the member process is gone, and its postgres with it.
                self.views[member.name] = dataclasses.replace(self.views[member.name], refused_at=time.monotonic())
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            pass

    def _decide(self) -> None:
        chosen = decide.choose_primary(
            self.views, time.monotonic(), fresh_s=self.fresh_s, fence_deadline_s=self.fence_deadline_s
        )
        if chosen == self.target:
            return
        old, self.target = self.target, chosen
        SWITCHES.inc()
        log.info("primary endpoint target", target=chosen, previous=old)
        if old is not None:
            # Whatever the old member is now, its clients must not keep writing there.
            for task in list(self.sessions[old]):
                task.cancel()
        self.changed.set()
        self.changed = asyncio.Event()

    async def _wait_target(self) -> str | None:
        deadline = time.monotonic() + self.connect_wait_s
        while self.target is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return self.target

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = await self._wait_target()
        if name is None:
            REFUSED.inc()
            writer.close()
            return
        task = asyncio.current_task()
        self.sessions[name].add(task)
        SESSIONS.inc()
        try:
            member = self.members[name]
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(member.host, member.pg_port), 5)
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self.sessions[name].discard(task)
            SESSIONS.dec()
            writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    finally:
        with contextlib.suppress(OSError):
            dst.write_eof()
