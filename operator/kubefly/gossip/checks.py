"""Service checks the agent runs against the machines on its own host.

Each check runs on its own timer; a machine's check status is `passing`
when it has no checks or all of them passed last time, `failing` when any
failed after its grace period, and `unknown` until every check has a result.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from kubefly import logs

log = logs.get("kubefly.gossip.checks")


@dataclass(frozen=True)
class CheckSpec:
    name: str
    type: str  # tcp | http
    port: int
    path: str = "/"
    method: str = "GET"
    interval: float = 15.0
    timeout: float = 2.0
    grace: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_json(cls, d: dict) -> "CheckSpec":
        """Accepts the Machine API's camelCase or snake_case spelling."""
        def pick(*names, default=None):
            for n in names:
                if d.get(n) is not None:
                    return d[n]
            return default

        ctype = pick("type", default="tcp")
        if ctype not in ("tcp", "http"):
            raise ValueError(f"unknown check type {ctype!r}")
        port = int(pick("port"))
        if not 0 < port < 65536:
            raise ValueError(f"bad check port {port}")
        return cls(
            name=str(pick("name", default=f"{ctype}-{port}")),
            type=ctype,
            port=port,
            path=str(pick("path", default="/")),
            method=str(pick("method", default="GET")),
            interval=float(pick("interval_seconds", "intervalSeconds", "interval", default=15)),
            timeout=float(pick("timeout_seconds", "timeoutSeconds", "timeout", default=2)),
            grace=float(pick("grace_period_seconds", "gracePeriodSeconds", "grace_period", default=0)),
            headers=tuple(sorted((pick("headers", default={}) or {}).items())),
        )


async def run_once(spec: CheckSpec, address: str) -> bool:
    """One probe: TCP connect, or an HTTP/1.1 request answered with 2xx/3xx."""
    host = address.strip("[]")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, spec.port), spec.timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        if spec.type == "tcp":
            return True
        netloc = f"[{host}]" if ":" in host else host
        head = "".join(f"{k}: {v}\r\n" for k, v in spec.headers)
        writer.write(
            f"{spec.method} {spec.path} HTTP/1.1\r\nHost: {netloc}:{spec.port}\r\n"
            f"User-Agent: kubefly-agent\r\n{head}Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), spec.timeout)
        parts = status.split()
        return len(parts) >= 2 and parts[1][:1] in (b"2", b"3")
    except (OSError, asyncio.TimeoutError, ValueError):
        return False
    finally:
        writer.close()


class MachineChecks:
    """The check loops of one machine; calls on_change() when its status changes."""

    def __init__(self, address: str, specs: list[CheckSpec], on_change: Callable[[], None]):
        self.address = address
        self.specs = specs
        self._results: dict[str, bool] = {}
        self._started = time.monotonic()
        self._on_change = on_change
        self._tasks = [asyncio.create_task(self._loop(s)) for s in specs]

    @property
    def status(self) -> str:
        if not self.specs:
            return "passing"
        if any(v is False for v in self._results.values()):
            return "failing"
        if len(self._results) < len(self.specs):
            return "unknown"
        return "passing"

    def failing(self) -> list[str]:
        """The checks whose latest result (after their grace period) failed."""
        return [s.name for s in self.specs if self._results.get(s.name) is False]

    async def _loop(self, spec: CheckSpec) -> None:
        while True:
            ok = await run_once(spec, self.address)
            if not ok and time.monotonic() - self._started < spec.grace:
                self._results.pop(spec.name, None)  # failures in the grace period do not count
            elif self._results.get(spec.name) is not ok:
                before = self.status
                self._results[spec.name] = ok
                if self.status != before:
                    log.info("check status", address=self.address, check=spec.name, passing=ok)
                    self._on_change()
            await asyncio.sleep(spec.interval)

    def cancel(self) -> None:
        for t in self._tasks:
            t.cancel()
