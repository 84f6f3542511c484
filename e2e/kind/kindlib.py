"""Helpers of the kind tier (e2e/kind): the cluster handle the fixtures hand out."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOOLS_BIN = Path(os.environ.get("KUBEFLY_CACHE", Path.home() / ".cache" / "kubefly")) / "bin"
KIND_CONFIG = yaml.safe_load((REPO / "kind-config.yaml").read_text())
RELEASE, RELEASE_NAMESPACE = "kubefly", "kubefly-system"


def host_ports() -> list[int]:
    return [m["hostPort"] for n in KIND_CONFIG["nodes"] for m in n.get("extraPortMappings", [])]


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_offset() -> int:
    """An offset that moves every mapped host port to a free one, so the test
    cluster can run beside `make up`'s."""
    for offset in range(20000, 40000, 1000):
        if all(_free(p + offset) for p in host_ports()):
            return offset
    pytest.fail(f"no free offset for the mapped host ports {host_ports()}", pytrace=False)


@dataclass
class KindCluster:
    name: str
    kubeconfig: Path
    images: dict[str, str] = field(default_factory=dict)
    # Mapped host ports, fixed when the cluster is made (kind-config.yaml's hostPort plus the offset).
    _ports: dict[int, int] = field(default_factory=dict, repr=False)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(TOOLS_BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def apply(self, manifest: dict | list[dict], namespace: str | None = None) -> None:
        docs = manifest if isinstance(manifest, list) else [manifest]
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", *ns, "-f", "-", input=yaml.safe_dump_all(docs))

    def wait_for(self, what: str, probe, timeout: float = 120.0, interval: float = 1.0):
        """Poll `probe` until it returns something truthy; fail naming `what` and the last value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")

    def host_port(self, container_port: int) -> int:
        """The host port mapped to a node's `container_port` (kind-config.yaml's
        extraPortMappings), as Docker reports it for this cluster's nodes."""
        if container_port in self._ports:
            return self._ports[container_port]
        ports = subprocess.run(
            ["docker", "ps", "--filter", f"label=io.x-k8s.kind.cluster={self.name}", "--format", "{{.Ports}}"],
            capture_output=True, text=True, check=True,
        ).stdout
        for mapping in ports.replace("\n", ",").split(","):
            host, _, target = mapping.strip().partition("->")
            if target == f"{container_port}/tcp":
                self._ports[container_port] = int(host.rpartition(":")[2])
                return self._ports[container_port]
        raise AssertionError(f"no host port maps to {container_port} on cluster {self.name}: {ports!r}")

    def ask(self, host_header: str, timeout: float = 5) -> int:
        """One GET through the edge proxy's mapped port for `host_header`: its status, 0 when it did not answer."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.host_port(8080)}/", headers={"Host": host_header})
        try:
            return urllib.request.urlopen(request, timeout=timeout).status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0
