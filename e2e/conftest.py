"""Cluster-tier fixtures: a real control plane (etcd, kube-apiserver with RBAC,
controller-manager, scheduler) with kwok-simulated hosts named by kind-config.yaml.

The cluster is built for the session and deleted after it (set
KUBEFLY_KEEP_CLUSTER=1 to keep it). A test that needs the cluster when it
cannot be built fails with the reason; it never skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubefly.devcluster import TOOLS_BIN, ClusterUnavailable, LocalCluster
from kubefly.ports import free_port

REPO = Path(__file__).resolve().parents[1]
E2E_CLUSTER = os.environ.get("KUBEFLY_E2E_CLUSTER", "kubefly-e2e")
CHART = REPO / "charts" / "kubefly"
RELEASE = "kubefly"
RELEASE_NAMESPACE = "kubefly-system"
SERVICE_ACCOUNT = "kubefly"  # the chart's full name for release "kubefly"
KUBEFLY = Path(sys.executable).with_name("kubefly")


def pytest_configure(config):
    config.addinivalue_line("markers", "disruptive: changes the shared cluster (uninstalls the chart); runs last")


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.cluster)
    # Tests that uninstall the chart invalidate the session operator's token: run them last.
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


@dataclass
class Kube:
    cluster: LocalCluster
    chart: Path = CHART
    release: str = RELEASE
    release_namespace: str = RELEASE_NAMESPACE
    service_account: str = SERVICE_ACCOUNT
    # Where the kube-apiserver (a local process here) calls the session operator's Volume webhook.
    webhook_port: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.cluster.kubeconfig

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, input=input, check=check)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(TOOLS_BIN / "helm"), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def apply(self, manifest: dict) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def get(self, namespace: str, kind: str, name: str) -> dict | None:
        """The object as JSON, or None when it does not exist."""
        proc = self.kubectl("-n", namespace, "get", kind, name, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def wait_for(self, what: str, probe, timeout: float = 30.0, interval: float = 0.3):
        """Poll `probe` until it returns something truthy; fail naming `what` and the last value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")


@pytest.fixture(scope="session")
def kube() -> Kube:
    cluster = LocalCluster(E2E_CLUSTER)
    try:
        cluster.up()
    except ClusterUnavailable as exc:
        pytest.fail(f"the local control plane could not start: {exc}", pytrace=False)
    kube = Kube(cluster, webhook_port=free_port())
    # The platform is installed the way users install it: the chart (CRDs, RBAC,
    # ServiceAccounts, the agent DaemonSet, simulated here); the operator runs as
    # a local process (fixture `operator`), agents too where a test needs them.
    # The API server runs on this machine too: it calls the operator's Volume
    # admission webhook at 127.0.0.1 (the chart's operator.webhook.url).
    kube.helm(
        "upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
        "--create-namespace", "--set", "operator.enabled=false", "--set", "agent.enabled=true",
        "--set", f"operator.webhook.url=https://127.0.0.1:{kube.webhook_port}/validate/volumes",
        "--wait", "--timeout", "120s",
    )
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO / "crds"))
    yield kube
    if os.environ.get("KUBEFLY_KEEP_CLUSTER") != "1":
        cluster.down()


@pytest.fixture
def namespace(kube: Kube):
    """A fresh namespace (organisation) per test."""
    name = f"org-{uuid.uuid4().hex[:8]}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)




@dataclass
class OperatorProcess:
    """`kubefly operator` as a local process acting as the chart's ServiceAccount."""

    kube: Kube
    workdir: Path
    extra_args: tuple[str, ...] = ()
    # Its name in the leadership Lease: kept across restart(), as a pod's is across container restarts,
    # so a restarted operator takes its own Lease back at once.
    identity: str = "session-operator"
    # Its admission webhook's port: the one the chart registered for the session operator,
    # else a free one (kept across restart()); every process shares the certificate's Secret.
    webhook_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "operator.log"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def start(self) -> "OperatorProcess":
        import urllib.request

        self.kube.cluster.service_account_kubeconfig(RELEASE_NAMESPACE, SERVICE_ACCOUNT, self.kubeconfig)
        health, metrics = free_port(), free_port()
        self.webhook_port = self.webhook_port or free_port()
        self.health_url = f"http://127.0.0.1:{health}/healthz"
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        webhook = [f"--webhook-port={self.webhook_port}", "--webhook-host=127.0.0.1",
                   f"--webhook-secret={RELEASE}-webhook-tls", f"--webhook-config={RELEASE}-volumes"]
        self.process = subprocess.Popen(
            [str(KUBEFLY), "operator", f"--leader-identity={self.identity}",
             f"--health-port={health}", f"--metrics-port={metrics}", *webhook, *self.extra_args],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
        )

        def healthy():
            if self.process.poll() is not None:
                pytest.fail(f"the operator exited with {self.process.returncode}:\n{self.logs()[-4000:]}", pytrace=False)
            try:
                return urllib.request.urlopen(self.health_url, timeout=2).status == 200
            except OSError:
                return False

        try:
            self.kube.wait_for("the operator's /healthz", healthy, timeout=60)
        except BaseException:
            # Never leave an operator behind that a later test or session would compete with.
            if self.process.poll() is None:
                self.kill()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no cleanup of any kind."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> "OperatorProcess":
        if self.process and self.process.poll() is None:
            self.kill()
        return self.start()


@pytest.fixture
def operator_process() -> type[OperatorProcess]:
    """The class, for a test that runs operators of its own: a test module cannot import it from
    `conftest` by name in a whole run, where another tier's conftest holds that module name."""
    return OperatorProcess


@pytest.fixture
def standby_operator(kube: Kube, operator: OperatorProcess, tmp_path):
    """A second replica, started after the session operator holds the Lease: it stands by."""
    handle = OperatorProcess(kube, tmp_path, identity=f"standby-{uuid.uuid4().hex[:6]}").start()
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def operator(kube: Kube, tmp_path_factory):
    """The operator for the whole session; tests may kill() and restart() it."""
    handle = OperatorProcess(kube, tmp_path_factory.mktemp("operator"), webhook_port=kube.webhook_port).start()
    yield handle
    handle.stop()
