"""The local control plane for the cluster test tier and for `make up` without Docker.

Real etcd, kube-apiserver (RBAC and admission on), kube-controller-manager and
kube-scheduler, built from source by hack/build-tools.sh and run by kwokctl's
binary runtime; kwok simulates the hosts that kind-config.yaml names, with
their regions and a realistic allocatable. Nothing runs inside the pods.

    python -m kubefly.devcluster up [--name NAME]     # prints the kubeconfig path last
    python -m kubefly.devcluster down [--name NAME]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from kubefly import topology
from kubefly.labels import NODE_REGION

REPO_ROOT = topology.REPO_ROOT
CACHE = Path(os.environ.get("KUBEFLY_CACHE", Path.home() / ".cache" / "kubefly"))
TOOLS_BIN = CACHE / "bin"
KWOK_WORKDIR = CACHE / "kwok"
# kwok manages only nodes carrying this annotation, so a test can take a host
# away (its heartbeats stop and the node-lifecycle controller marks it NotReady).
KWOK_ANNOTATION = "kwok.x-k8s.io/node"


class ClusterUnavailable(RuntimeError):
    """The local control plane cannot be built or started; the message says why."""


def pinned_versions(path: Path = REPO_ROOT / "versions.env") -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def ensure_tools() -> Path:
    """Build (or find cached) the pinned binaries; fail with the build's own words."""
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "build-tools.sh"), "k8s", "etcd", "kwok"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ClusterUnavailable(f"building the Kubernetes binaries failed:\n{proc.stderr[-4000:]}")
    return TOOLS_BIN


def host_manifest(
    name: str,
    labels: dict[str, str],
    *,
    control_plane: bool = False,
    cpu: str = "4",
    memory: str = "8Gi",
    pods: int = 110,
    volume_capacity_gb: int = 100,
) -> dict:
    """A Node as kwok simulates it: a kind-like host with realistic allocatable."""
    resources = {"cpu": cpu, "memory": memory, "pods": str(pods), "ephemeral-storage": f"{volume_capacity_gb}Gi"}
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **labels,
            },
        },
        "spec": {},
        "status": {"capacity": resources, "allocatable": resources, "nodeInfo": {"kubeletVersion": "fake"}},
    }
    if control_plane:
        node["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = ""
        node["spec"]["taints"] = [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]
    return node


class LocalCluster:
    def __init__(self, name: str = "kubefly", topo: topology.Topology | None = None):
        self.name = name
        self.topology = topo or topology.load()

    @property
    def kubeconfig(self) -> Path:
        return KWOK_WORKDIR / "clusters" / self.name / "kubeconfig.yaml"

    def _env(self) -> dict[str, str]:
        versions = pinned_versions()
        return {
            **os.environ,
            "KWOK_WORKDIR": str(KWOK_WORKDIR),
            "KWOK_KUBE_VERSION": versions["KUBERNETES_VERSION"],
            "KWOK_KUBE_BINARY_PREFIX": str(TOOLS_BIN),
            "KWOK_KUBECTL_BINARY": str(TOOLS_BIN / "kubectl"),
            "KWOK_ETCD_BINARY": str(TOOLS_BIN / "etcd"),
            "KWOK_CONTROLLER_BINARY": str(TOOLS_BIN / "kwok"),
        }

    def kwokctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(TOOLS_BIN / "kwokctl"), "--name", self.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
        )
        if check and proc.returncode != 0:
            raise ClusterUnavailable(f"kwokctl {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
        return proc

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(TOOLS_BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def dead_components(self) -> list[str]:
        """Components whose process is gone (kwokctl starts them once and never restarts them)."""
        pids = KWOK_WORKDIR / "clusters" / self.name / "pids"
        dead = []
        for pidfile in sorted(pids.glob("*.pid")) if pids.is_dir() else []:
            try:
                os.kill(int(pidfile.read_text().strip()), 0)
            except (ValueError, ProcessLookupError):
                dead.append(pidfile.stem)
            except PermissionError:
                pass  # alive, another user's
        return dead

    def healthy(self) -> bool:
        if not self.kubeconfig.exists() or self.dead_components():
            return False
        return self.kubectl("get", "--raw", "/readyz", "--request-timeout=3s", check=False).returncode == 0

    def up(self) -> Path:
        ensure_tools()
        if not self.healthy():
            # A stale cluster (processes gone after a reboot) is removed first.
            self.kwokctl("delete", "cluster", check=False)
            self.kwokctl(
                "create", "cluster",
                "--runtime", "binary",
                "--secure-port",  # serve HTTPS; this turns on RBAC and admission too
                "--kube-authorization",
                "--kube-admission",
                "--kubeconfig", "",  # leave ~/.kube/config alone
                "--wait", "90s",
                # kwokctl's defaults notice a lost host after 3m20s; factor 1 gives a
                # 40 s lease and grace period, close to a real cluster's 50 s.
                "--heartbeat-factor", "1",
                "--extra-args", "kwok-controller=manage-all-nodes=false",
                "--extra-args", f"kwok-controller=manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            )
        # Without the controller-manager nothing binds volumes or marks lost hosts:
        # a cluster with a dead component is not up, whatever /readyz says.
        dead = self.dead_components()
        if dead:
            raise ClusterUnavailable(f"cluster {self.name}: {', '.join(dead)} exited; see {KWOK_WORKDIR / 'clusters' / self.name / 'logs'}")
        for host in self.topology.hosts:
            self.apply_host(host.name, host.labels, control_plane=host.role == "control-plane")
        self.wait_hosts_ready([h.name for h in self.topology.hosts])
        return self.kubeconfig

    def down(self) -> None:
        self.kwokctl("delete", "cluster", check=False)

    def apply_host(self, name: str, labels: dict[str, str], **kwargs) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(host_manifest(name, labels, **kwargs)))

    def add_host(self, name: str, region: str, **kwargs) -> None:
        """A simulated host beyond kind-config.yaml's (tests and benchmarks at scale)."""
        self.apply_host(name, {NODE_REGION: region}, **kwargs)
        self.wait_hosts_ready([name])

    def stop_host(self, name: str) -> None:
        """The host dies as the API sees it: status heartbeats and Lease renewals stop.

        kwok keeps renewing the Lease of a node it once managed, so the test takes
        the Lease over with a long duration; the controller-manager then marks the
        node NotReady (Unknown) after its grace period, as for a dead kubelet.
        """
        from datetime import datetime, timezone

        self.kubectl("annotate", "node", name, f"{KWOK_ANNOTATION}-")
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        patch = {"spec": {"holderIdentity": "kubefly-devcluster/stopped-host", "leaseDurationSeconds": 86400, "renewTime": now}}
        self.kubectl("-n", "kube-node-lease", "patch", "lease", name, "--type=merge", "-p", json.dumps(patch))

    def start_host(self, name: str) -> None:
        """The host comes back: kwok heartbeats it again and recreates its Lease."""
        self.kubectl("annotate", "node", name, f"{KWOK_ANNOTATION}=fake", "--overwrite")
        self.kubectl("-n", "kube-node-lease", "delete", "lease", name, "--ignore-not-found")

    def delete_host(self, name: str) -> None:
        self.kubectl("delete", "node", name, "--wait=false")

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path, hours: int = 24,
                                   bind_pod: str | None = None) -> Path:
        """A kubeconfig that acts as a ServiceAccount, with a token from the TokenRequest API.

        Running the operator with it proves the chart's RBAC is enough, and no more.
        `bind_pod`: bound to that pod (of this ServiceAccount), so the token names the
        pod's node as a kubelet's projected token does (the agent's admission policy needs it).
        """
        import yaml

        bind = ["--bound-object-kind", "Pod", "--bound-object-name", bind_pod] if bind_pod else []
        token = self.kubectl("-n", namespace, "create", "token", name, f"--duration={hours}h", *bind).stdout.strip()
        admin = yaml.safe_load(self.kubeconfig.read_text())
        cluster = admin["clusters"][0]["cluster"]
        user = f"system:serviceaccount:{namespace}:{name}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": self.name, "cluster": cluster}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": self.name, "user": user}}],
            "current-context": user,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def wait_hosts_ready(self, names: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                proc = self.kubectl(
                    "get", "node", name, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                    check=False,
                )
                if proc.stdout.strip() == "True":
                    pending.discard(name)
            if pending:
                time.sleep(0.5)
        if pending:
            raise ClusterUnavailable(f"hosts not Ready after {timeout:.0f}s: {sorted(pending)}")


@click.group()
def main() -> None:
    """The local control plane (kwok tier)."""


@main.command()
@click.option("--name", default="kubefly", show_default=True)
def up(name: str) -> None:
    """Start (or reuse) the cluster; print its kubeconfig path as the last line."""
    cluster = LocalCluster(name)
    t0 = time.monotonic()
    print(f"[cluster] starting {name}: {len(cluster.topology.hosts)} hosts from kind-config.yaml", file=sys.stderr)
    try:
        kubeconfig = cluster.up()
    except ClusterUnavailable as exc:
        raise click.ClickException(str(exc)) from exc
    print(f"[cluster] ready in {time.monotonic() - t0:.1f}s; hosts: "
          + ", ".join(f"{h.name} ({h.region or h.role})" for h in cluster.topology.hosts), file=sys.stderr)
    print(kubeconfig)


@main.command()
@click.option("--name", default="kubefly", show_default=True)
def down(name: str) -> None:
    """Stop and delete the cluster."""
    LocalCluster(name).down()
    print(f"[cluster] {name} deleted", file=sys.stderr)


@main.command("sa-kubeconfig")
@click.option("--name", default="kubefly", show_default=True, help="Cluster name.")
@click.option("--namespace", required=True, help="Namespace of the ServiceAccount.")
@click.option("--service-account", required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def sa_kubeconfig(name: str, namespace: str, service_account: str, out: Path) -> None:
    """Write a kubeconfig that acts as a ServiceAccount; print its path."""
    print(LocalCluster(name).service_account_kubeconfig(namespace, service_account, out))


if __name__ == "__main__":
    main()
