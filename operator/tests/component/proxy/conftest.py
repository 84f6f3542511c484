"""A two-host platform on loopback: two real agents gossiping, a real proxy per
host (edge + host roles), real app processes as instances.

host-000 is in region r0, host-001 in r1. Every process started here is
stopped at the end of the module.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from kubefly.gossip.harness import AgentCluster, AgentProc, free_port

sys.path.insert(0, str(Path(__file__).parent))  # starter.py: the operator's part, also for the fixtures

KUBEFLY = str(Path(sys.executable).parent / "kubefly")
STARTER = Path(__file__).with_name("starter.py")
DOMAIN = "test"
HOP_TOKEN = "the-platform-hop-token-for-these-tests"  # as the chart mounts the operator's Secret


def wait_port(port: int, timeout: float = 20.0, ip: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((ip, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class HostsCluster(AgentCluster):
    """Agents as on separate hosts: each binds and advertises its own loopback IP
    (host-000 127.0.0.1, host-001 127.0.0.2, ...), so each host's proxy takes hops
    on the same port at its host's address, which the proxies learn from the agents."""

    def __init__(self, n: int, *, load_token_file: Path | None = None, **kw):
        super().__init__(n, **kw)
        self.seed_addrs = [f"{self.ip(a)}:{a.gossip_port}" for a in self.agents[:2]]
        self.load_token_file = load_token_file

    @staticmethod
    def ip(a: AgentProc) -> str:
        return f"127.0.0.{a.index + 1}"

    def command(self, a: AgentProc) -> list[str]:
        me = f"{self.ip(a)}:{a.gossip_port}"
        cmd = [KUBEFLY, "agent", "--host", a.host, "--region", a.region, "--gossip", me,
               "--api", f"127.0.0.1:{a.api_port}", "--data-dir", str(a.data), "--key-file", str(self.key_file),
               "--source", "dir", "--machines-dir", str(a.machines), "--source-poll", "0.1"]
        if self.load_token_file is not None:  # as the chart runs them: load reports need the proxies' token
            cmd += ["--load-token-file", str(self.load_token_file)]
        for s in self.seed_addrs:
            if s != me:
                cmd += ["--seed", s]
        return cmd


@dataclass
class ProxyProc:
    host: str
    port: int
    hop_ip: str
    hop_port: int
    metrics_port: int
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    domain: str = DOMAIN

    def _ready_lines(self) -> int:
        return self.log.read_text().count('"proxy ready"') if self.log.exists() else 0

    def start(self, timeout: float = 30.0) -> None:
        # Ready means this process logged so: during a restart the old one still holds the port.
        before = self._ready_lines()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self._ready_lines() == before:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"proxy did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        wait_port(self.port)
        wait_port(self.hop_port, ip=self.hop_ip)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **labels) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@dataclass
class Platform:
    cluster: AgentCluster
    proxies: list[ProxyProc]
    config: Path
    spec: Path
    backends: list[subprocess.Popen] = field(default_factory=list)
    starter_spec: dict = field(default_factory=dict)

    @property
    def agents(self):
        return self.cluster.agents

    def backend(self, machine_id: str, **kw) -> int:
        port = free_port()
        argv = [sys.executable, "-m", "kubefly.proxy.testapp", "--host", "127.0.0.1", "--port", str(port),
                "--machine-id", machine_id]
        for k, v in kw.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        self.backends.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              start_new_session=True))
        wait_port(port)
        return port

    def machine(self, host: int, machine_id: str, app: str, port: int, *, org: str = "acme", soft: int = 20,
                hard: int | None = None, state: str = "started", autostop: str = "off",
                concurrency: str = "requests", public: bool = True) -> None:
        """public=False: the service has no public port (private, as a Postgres member's)."""
        ports = [80] if public else []
        service = {"internal_port": port, "ports": ports, "http_ports": ports, "concurrency_type": concurrency,
                   "soft_limit": soft, "hard_limit": hard, "autostart": True, "autostop": autostop}
        self.cluster.write_machine(self.agents[host], machine_id, org=org, app=app, state=state, services=[service])

    def stoppable(self, host: int, machine_id: str, app: str) -> Path:
        """A stopped machine the starter can start (a port reserved for its app process)."""
        port = free_port()
        self.machine(host, machine_id, app, port, state="stopped", autostop="stop")
        pidfile = self.cluster.root / f"{machine_id}.pid"
        self.starter_spec[machine_id] = {"file": str(self.agents[host].machines / f"{machine_id}.json"),
                                         "port": port, "pidfile": str(pidfile)}
        self.spec.write_text(json.dumps(self.starter_spec))
        return pidfile

    def stopped_machine(self, host: int, machine_id: str, app: str, *, org: str = "acme", status: str = "created",
                        terminating: bool = False, **service) -> Path:
        """A Machine object applied `state: stopped` (status `created`: placed on the host, never
        booted) in the agent's directory, as the agent reads it from the Kubernetes API; the
        starter plays the operator (spec.state, the Pod, status.state). `terminating`: its pod
        is still there, being deleted (written first). Returns the Machine file."""
        from starter import pod_of, write_json

        agent = self.agents[host]
        port = free_port()
        path = agent.machines / f"{machine_id}.json"
        doc = {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine",
               "metadata": {"name": machine_id, "namespace": org, "uid": f"uid-{machine_id}", "generation": 1},
               "spec": {"app": app, "region": agent.region, "image": "testapp", "state": "stopped",
                        "services": [{"internalPort": port, "ports": [{"port": 80, "handlers": ["http"]}], "autostart": True,
                                      "autostop": "stop", "concurrency": {"type": "requests"}, **service}]},
               "status": {"state": status, "host": agent.host, "region": agent.region,
                          "instanceId": f"{machine_id}-v1"}}
        self.starter_spec[machine_id] = {"file": str(path), "pod": str(agent.machines / f"{machine_id}-pod.json"),
                                         "port": port, "pidfile": str(self.cluster.root / f"{machine_id}.pid")}
        self.spec.write_text(json.dumps(self.starter_spec))
        if terminating:
            pod = pod_of(doc, agent.host, port)
            pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            write_json(Path(self.starter_spec[machine_id]["pod"]), pod)
        write_json(path, doc)
        return path

    def wait_routable(self, app: str, machines: set[str], timeout: float = 30.0) -> None:
        """Until every proxy's replica shows these machines routable (seen through forced requests)."""
        deadline = time.monotonic() + timeout
        for proxy in self.proxies:
            for machine in machines:
                while True:
                    req = urllib.request.Request(proxy.url + "/", headers={
                        "Host": f"{app}.{DOMAIN}", "fly-force-instance-id": machine})
                    try:
                        with urllib.request.urlopen(req, timeout=5) as r:
                            if r.headers.get("x-machine-id") == machine:
                                break
                    except OSError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{machine} of {app} not routable at {proxy.host}")
                    time.sleep(0.1)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy")
    (root / "agents").mkdir()
    token = root / "hop-token"
    token.write_text(HOP_TOKEN + "\n")
    cluster = HostsCluster(2, regions=2, root=root / "agents", load_token_file=token)
    for a in cluster.agents:
        cluster.spawn(a)
    for a in cluster.agents:
        wait_port(a.api_port, 60)
    spec = root / "starter.json"
    spec.write_text("{}")
    hop = free_port()  # the platform's hop port: the same on every host, as a DaemonSet's host port
    ports = [(free_port(), free_port()) for _ in cluster.agents]
    config = root / "proxy.yaml"
    config.write_text(yaml.safe_dump({
        "domain": DOMAIN,
        "retry_budget_s": 1.0,
        "response_timeout_s": 3.0,
        "autostart_timeout_s": 30.0,
        "autostop_interval_s": 1.0,
        "app_max_inflight": 20,
        "strategies": {"acme/spread": "leastload"},
    }))
    proxies = []
    for a, (port, met) in zip(cluster.agents, ports):
        hop_ip = cluster.ip(a)
        argv = [KUBEFLY, "proxy", "--listen", f"127.0.0.1:{port}", "--hop-listen", f"{hop_ip}:{hop}",
                "--hop-token-file", str(token), "--metrics-listen", f"127.0.0.1:{met}", "--agent", a.api, "--config", str(config),
                "--starter", f"command:{sys.executable} {STARTER} {spec}", "--drain-timeout", "10"]
        proxies.append(ProxyProc(a.host, port, hop_ip, hop, met, argv, root / f"proxy-{a.host}.log"))
    p = Platform(cluster, proxies, config, spec)
    try:
        for proxy in proxies:
            proxy.start()
        yield p
    finally:
        for proxy in proxies:
            proxy.stop()
        for b in p.backends:
            b.terminate()
        for entry in p.starter_spec.values():
            pid = Path(entry["pidfile"])
            if pid.exists():
                subprocess.run(["kill", pid.read_text()], check=False)
        for b in p.backends:
            b.wait(10)
        for a in cluster.agents:
            cluster.kill(a, signal.SIGTERM)
