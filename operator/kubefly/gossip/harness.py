"""Start and drive real `kubefly agent` processes on loopback.

Used by the component tests and `bench/gossip.py`: N agents with distinct
ports, a shared cluster key, a machines directory and data directory each.
Every process started here is killed by `close()`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from kubefly.gossip.client import Key
from kubefly.ports import free_port


@dataclass
class AgentProc:
    index: int
    host: str
    region: str
    gossip_port: int
    api_port: int
    machines: Path
    data: Path
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class AgentCluster:
    def __init__(self, n: int, *, regions: int = 3, root: Path | None = None, seeds: int = 2,
                 extra_args: tuple[str, ...] = (), env: dict | None = None, keep: bool = False):
        self._own_root = root is None and not keep
        self.root = root or Path(tempfile.mkdtemp(prefix="kubefly-gossip-"))
        self.key = secrets.token_urlsafe(32).encode()
        self.key_file = self.root / "cluster.key"
        self.key_file.write_bytes(self.key)
        self.extra_args = tuple(extra_args)
        self.env = {**os.environ, **(env or {})}
        self.agents = [
            AgentProc(i, f"host-{i:03d}", f"r{i % regions}", free_port(), free_port(),
                      self.root / f"machines-{i}", self.root / f"data-{i}", self.root / f"agent-{i}.log")
            for i in range(n)
        ]
        self.seed_addrs = [f"127.0.0.1:{a.gossip_port}" for a in self.agents[:seeds]]
        self._session: aiohttp.ClientSession | None = None

    # -- processes -------------------------------------------------------------
    def command(self, a: AgentProc) -> list[str]:
        cmd = [str(Path(sys.executable).parent / "kubefly"), "agent", "--host", a.host, "--region", a.region,
               "--gossip", f"127.0.0.1:{a.gossip_port}", "--api", f"127.0.0.1:{a.api_port}",
               "--data-dir", str(a.data), "--key-file", str(self.key_file), "--source", "dir",
               "--machines-dir", str(a.machines), "--source-poll", "0.1", "--admin-api", *self.extra_args]
        for s in self.seed_addrs:
            if s != f"127.0.0.1:{a.gossip_port}":
                cmd += ["--seed", s]
        return cmd

    def spawn(self, a: AgentProc) -> None:
        a.machines.mkdir(parents=True, exist_ok=True)
        with open(a.log, "ab") as log:
            a.proc = subprocess.Popen(self.command(a), stdout=subprocess.DEVNULL, stderr=log, env=self.env,
                                      start_new_session=True)

    async def start(self, timeout: float = 120.0) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        for a in self.agents:
            self.spawn(a)
        await self.wait_ready(self.agents, timeout)

    async def wait_ready(self, agents: list[AgentProc], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(agents)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents not ready: {[a.host for a in pending]}")
            for a in list(pending):
                if a.proc is not None and a.proc.poll() is not None:
                    raise RuntimeError(f"{a.host} exited {a.proc.returncode}: {a.log.read_text()[-2000:]}")
                try:
                    async with self.session.get(a.api + "/healthz") as r:
                        if r.status == 200:
                            pending.remove(a)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
            await asyncio.sleep(0.2)

    def kill(self, a: AgentProc, sig: int = signal.SIGKILL) -> None:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.send_signal(sig)
            try:
                a.proc.wait(10)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()

    async def restart(self, a: AgentProc, timeout: float = 30.0) -> None:
        self.kill(a)
        self.spawn(a)
        await self.wait_ready([a], timeout)

    async def close(self) -> None:
        for a in self.agents:
            if a.proc is not None and a.proc.poll() is None:
                a.proc.terminate()
        for a in self.agents:
            if a.proc is not None:
                try:
                    a.proc.wait(5)
                except subprocess.TimeoutExpired:
                    a.proc.kill()
                    a.proc.wait()
        if self._session is not None:
            await self._session.close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() first"
        return self._session

    # -- machines (the dir source) -----------------------------------------------
    def write_machine(self, a: AgentProc, machine_id: str, *, org: str = "acme", app: str = "web",
                      address: str = "127.0.0.1", state: str = "started", **extra) -> dict:
        doc = {"org": org, "app": app, "machine_id": machine_id, "instance_id": extra.pop("instance_id", machine_id),
               "address": address, "state": state, "region": a.region,
               "services": extra.pop("services", [{"internal_port": 8080, "ports": [80], "http_ports": [80]}]), **extra}
        tmp = a.machines / f".{machine_id}.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, a.machines / f"{machine_id}.json")  # atomic: the agent never reads half a file
        return doc

    def delete_machine(self, a: AgentProc, machine_id: str) -> None:
        (a.machines / f"{machine_id}.json").unlink(missing_ok=True)

    # -- the local API -----------------------------------------------------------
    async def get(self, a: AgentProc, path: str) -> dict:
        async with self.session.get(a.api + path) as r:
            r.raise_for_status()
            return await r.json()

    async def post(self, a: AgentProc, path: str, body: dict) -> tuple[int, dict]:
        async with self.session.post(a.api + path, json=body) as r:
            return r.status, await r.json()

    async def instances(self, a: AgentProc) -> dict[Key, dict]:
        doc = await self.get(a, "/v1/instances")
        return {(i["org"], i["machine_id"]): i for i in doc["instances"]}

    async def metric(self, a: AgentProc, name: str, labels: str = "") -> float:
        async with self.session.get(a.api + "/metrics") as r:
            text = await r.text()
        want = f"{name}{{{labels}}}" if labels else name
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(want + " "))

    async def partition(self, group: list[AgentProc]) -> None:
        """Cut `group` off from everyone else, in both directions, at every agent."""
        inside = {a.host for a in group}
        everyone = {a.host for a in self.agents}
        for a in self.agents:
            if a.running:
                drop = everyone - inside if a.host in inside else inside
                await self.post(a, "/v1/admin/partition", {"drop": sorted(drop)})

    async def heal(self) -> None:
        for a in self.agents:
            if a.running:
                await self.post(a, "/v1/admin/partition", {"drop": []})

    async def converge(self, agents: list[AgentProc], predicate, timeout: float = 10.0,
                       interval: float = 0.2) -> bool:
        """Wait until predicate(instances) holds on every agent given (polling each API)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = await asyncio.gather(*(self.instances(a) for a in agents))
            if all(predicate(v) for v in views):
                return True
            await asyncio.sleep(interval)
        return False
