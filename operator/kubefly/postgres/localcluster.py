"""Real members and a real endpoint as local processes: the component tests' and the benchmark's cluster.

Members run `kubefly postgres member` (postgres + repmgrd from Debian) in
temporary directories. Two network modes:
- loopback: every member on 127.0.0.1, its own ports;
- netns (root only): each member in its own network namespace with two links,
  a "cluster" link (replication, peer health) and a "client" link (endpoint,
  tests). Cutting a member's cluster link is a real partition from its peers
  while the endpoint still sees it, the case where two primaries could meet.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kubefly.ports import free_port

NAMES = "abcdefg"




def kubefly_argv() -> list[str]:
    script = Path(sys.executable).parent / "kubefly"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from kubefly.cli.main import cli; cli()"]


@dataclass
class LocalMember:
    name: str
    node_id: int
    cluster_host: str  # peers reach it here
    client_host: str  # the endpoint and tests reach it here
    pg_port: int
    health_port: int
    data_dir: Path
    netns: str | None = None
    proc: subprocess.Popen | None = None

    @property
    def health_url(self) -> str:
        return f"http://{self.client_host}:{self.health_port}/health"

    def spec(self, host: str) -> str:
        return f"{self.name}={host}:{self.pg_port}:{self.health_port}"


class LocalCluster:
    def __init__(self, root: Path, *, members: int = 3, synchronous: bool = False, netns: bool = False,
                 fence_after_s: float = 3.0, region: str = "local", handover_timeout_s: float = 30.0,
                 member_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.member_env = dict(member_env or {})  # e.g. the KUBEFLY_PG_ARCHIVE_* settings
        self.synchronous = synchronous
        self.fence_after_s = fence_after_s
        self.handover_timeout_s = handover_timeout_s
        self.region = region
        self.tag = secrets.token_hex(2)
        self.netns = netns
        self.password = secrets.token_urlsafe(16)
        self.admin_token = secrets.token_urlsafe(16)  # what the members' admin endpoints require
        self.members: list[LocalMember] = []
        for i in range(members):
            name = NAMES[i]
            if netns:
                m = LocalMember(name, i + 1, f"10.231.1.{i + 1}", f"10.231.2.{i + 1}", 5432, 5500,
                                root / name, netns=f"kf{self.tag}{name}")
            else:
                m = LocalMember(name, i + 1, "127.0.0.1", "127.0.0.1", free_port(), free_port(), root / name)
            self.members.append(m)
        self.endpoint_port = free_port()
        self.endpoint_proc: subprocess.Popen | None = None

    # ---- network ---------------------------------------------------------------

    def _ip(self, *args: str, ns: str | None = None) -> None:
        argv = ["ip", *(["-n", ns] if ns else []), *args]
        subprocess.run(argv, check=True, capture_output=True)

    def _link(self, kind: str, m: LocalMember) -> str:
        return f"k{kind}{self.tag}{m.name}"  # the root-side end of the member's link; <= 15 chars

    @property
    def _switch(self) -> str:
        # The bridges live in a namespace of their own: a fresh one has no firewall rules, while the
        # host's (e.g. Docker's FORWARD policy drop, applied to bridged traffic) may drop ours.
        return f"kf{self.tag}sw"

    def _setup_network(self) -> None:
        sw = self._switch
        self._ip("netns", "add", sw)
        for kind in ("c", "x"):
            self._ip("link", "add", f"br{kind}", "type", "bridge", ns=sw)
            self._ip("link", "set", f"br{kind}", "up", ns=sw)
        # The root namespace (endpoint, tests) joins the client network only.
        self._ip("link", "add", f"kx{self.tag}r", "type", "veth", "peer", "name", "uplink", "netns", sw)
        self._ip("addr", "add", "10.231.2.254/24", "dev", f"kx{self.tag}r")
        self._ip("link", "set", f"kx{self.tag}r", "up")
        self._ip("link", "set", "uplink", "master", "brx", "up", ns=sw)
        for m in self.members:
            self._ip("netns", "add", m.netns)
            self._ip("link", "set", "lo", "up", ns=m.netns)
            for kind, inner in (("c", "eth0"), ("x", "eth1")):
                outer = self._link(kind, m)
                self._ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", m.netns, ns=sw)
                self._ip("link", "set", outer, "master", f"br{kind}", "up", ns=sw)
                ip = m.cluster_host if kind == "c" else m.client_host
                self._ip("addr", "add", f"{ip}/24", "dev", inner, ns=m.netns)
                self._ip("link", "set", inner, "up", ns=m.netns)

    def _teardown_network(self) -> None:
        for ns in [m.netns for m in self.members] + [self._switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def partition(self, name: str) -> None:
        """Cut the member off from its peers (its cluster link goes down); clients still reach it."""
        self._ip("link", "set", self._link("c", self.member(name)), "down", ns=self._switch)

    def heal(self, name: str) -> None:
        self._ip("link", "set", self._link("c", self.member(name)), "up", ns=self._switch)

    # ---- processes ---------------------------------------------------------------

    def member(self, name: str) -> LocalMember:
        return next(m for m in self.members if m.name == name)

    def _member_argv(self, m: LocalMember) -> list[str]:
        argv = [*kubefly_argv(), "postgres", "member", "--name", m.name, "--node-id", str(m.node_id),
                "--region", self.region, "--data-dir", str(m.data_dir), "--host", m.cluster_host,
                "--pg-port", str(m.pg_port), "--health-port", str(m.health_port),
                "--fence-after", str(self.fence_after_s), "--handover-timeout", str(self.handover_timeout_s),
                "--synchronous" if self.synchronous else "--no-synchronous"]
        if m.node_id == 1:
            argv.append("--bootstrap")
        for p in self.members:
            if p is not m:
                argv += ["--peer", p.spec(p.cluster_host)]
        return (["ip", "netns", "exec", m.netns] if m.netns else []) + argv

    def start_member(self, name: str) -> None:
        m = self.member(name)
        m.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **self.member_env, KUBEFLY_PG_SUPERUSER_PASSWORD=self.password,
                   KUBEFLY_PG_REPMGR_PASSWORD=self.password, KUBEFLY_PG_ADMIN_TOKEN=self.admin_token)
        log = open(self.root / f"{m.name}.member.log", "ab")
        # Its own session: a kill takes the member's whole process group (supervisor, postgres, repmgrd).
        m.proc = subprocess.Popen(self._member_argv(m), stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()

    def kill(self, name: str) -> None:
        """SIGKILL the member and everything it started, as when its machine dies."""
        m = self.member(name)
        if m.proc is not None and m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait()
        _kill_stragglers(m.data_dir)

    def kill_repmgrd(self, name: str) -> None:
        """SIGKILL the member's repmgrd alone (its supervisor starts it again after a few seconds)."""
        _kill_stragglers(self.member(name).data_dir, "/repmgrd ")

    def terminate(self, name: str, grace_s: float = 60.0) -> float:
        """Stop the member as the kubelet stops a pod: SIGTERM to the supervisor alone, SIGKILL
        to everything left after `grace_s`. Returns the seconds the member took to exit."""
        m = self.member(name)
        started = time.monotonic()
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGTERM)
            try:
                m.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(m.proc.pid, signal.SIGKILL)
                m.proc.wait()
        took = time.monotonic() - started
        _kill_stragglers(m.data_dir)
        return took

    def start(self, timeout: float = 120.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postgres user must reach the members' directories below
        if self.netns:
            self._setup_network()
        for m in self.members:
            self.start_member(m.name)
        log = open(self.root / "endpoint.log", "ab")
        argv = [*kubefly_argv(), "postgres", "endpoint", "--listen", f"127.0.0.1:{self.endpoint_port}",
                "--fence-deadline", str(self.fence_after_s + 2)]
        argv += [a for m in self.members for a in ("--member", m.spec(m.client_host))]
        self.endpoint_proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.wait_healthy(timeout)

    def stop(self) -> None:
        procs = [m.proc for m in self.members] + [self.endpoint_proc]
        for p in procs:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in procs:
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for m in self.members:
            _kill_stragglers(m.data_dir)
        if self.netns:
            self._teardown_network()

    # ---- observation ---------------------------------------------------------------

    def health(self, name: str, timeout: float = 1.0) -> dict | None:
        try:
            with urllib.request.urlopen(self.member(name).health_url, timeout=timeout) as resp:
                return json.load(resp)
        except (OSError, ValueError):
            return None

    def healths(self) -> dict[str, dict | None]:
        return {m.name: self.health(m.name) for m in self.members}

    def primary(self) -> str | None:
        found = [n for n, h in self.healths().items() if h and h["role"] == "primary" and h["writable"]]
        return found[0] if len(found) == 1 else None

    def wait_healthy(self, timeout: float, *, members: list[str] | None = None) -> str:
        """Until one writable primary and every other member streams from it, all with repmgrd; returns the primary."""
        names = members or [m.name for m in self.members]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = {n: self.health(n) for n in names}
            prim = [n for n, h in last.items() if h and h["role"] == "primary" and h["writable"] and h["repmgrd"]]
            standbys = [n for n, h in last.items() if h and h["role"] == "standby" and h["upstream"] and h["repmgrd"]
                        and h["timeline"] == last[prim[0]]["timeline"]] if len(prim) == 1 else []
            if len(prim) == 1 and len(standbys) == len(names) - 1:
                return prim[0]
            time.sleep(0.3)
        raise TimeoutError(f"cluster not healthy after {timeout}s: {last}")

    def admin_post(self, name: str, path: str, body: dict | None = None, *, timeout: float = 10.0,
                   token: str | None = None) -> tuple[int, dict | str]:
        """POST to member `name`'s admin endpoint with the cluster's token (or `token`): (status, answer)."""
        m = self.member(name)
        req = urllib.request.Request(f"http://{m.client_host}:{m.health_port}{path}", method="POST",
                                     data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.admin_token if token is None else token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def dsn(self, *, host: str = "127.0.0.1", port: int | None = None, dbname: str = "postgres") -> str:
        return (f"host={host} port={port or self.endpoint_port} user=postgres password={self.password} "
                f"dbname={dbname} connect_timeout=5")

    def member_dsn(self, name: str) -> str:
        m = self.member(name)
        return self.dsn(host=m.client_host, port=m.pg_port)


def _kill_stragglers(data_dir: Path, program: str = "") -> None:
    """SIGKILL any process (of `program`, if given) still running from this member's data directory."""
    marker = str(data_dir.resolve()) + "/"
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and program in cmdline and int(pid_dir.name) != os.getpid():
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def remove(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
