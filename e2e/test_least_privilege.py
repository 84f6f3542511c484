"""Least privilege in the API server: the chart's ValidatingAdmissionPolicies
(charts/kubefly/templates/admission.yaml) narrow the proxy, operator and agent
ServiceAccounts to what each process does, with real tokens from the
TokenRequest API (impersonation carries no token claims such as the node name)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from kubefly.volumes import objects


def token_kubeconfig(kube, sa: str, path: Path, *bind: str) -> Path:
    token = kube.kubectl("-n", kube.release_namespace, "create", "token", sa, *bind).stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "c", "user": sa}}],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def as_sa(kubeconfig: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    from kubefly.devcluster import TOOLS_BIN

    return subprocess.run([str(TOOLS_BIN / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
                          input=input, capture_output=True, text=True)


@pytest.fixture(scope="module")
def proxy_installed(kube, tmp_path_factory):
    """The session installs the chart without the proxy: turn it on for this module, then off again."""
    kube.helm("upgrade", kube.release, str(kube.chart), "--namespace", kube.release_namespace, "--reuse-values",
              "--set", "proxy.enabled=true", "--wait", "--timeout", "120s")
    # A new policy takes effect a moment after it is created: wait until an image change is refused.
    proxy = token_kubeconfig(kube, f"{kube.release}-proxy", tmp_path_factory.mktemp("proxy") / "kubeconfig")
    probe = {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine", "metadata": {"name": "probe", "namespace": kube.release_namespace},
             "spec": {"app": "probe", "region": "ams", "image": "nginx:1.27", "state": "stopped"}}
    kube.apply(probe)
    kube.wait_for("the proxy's admission policy", lambda: "not the rest of spec" in as_sa(
        proxy, "-n", kube.release_namespace, "patch", "machine", "probe", "--dry-run=server", "--type=merge",
        "-p", '{"spec": {"image": "x"}}').stderr)
    kube.kubectl("-n", kube.release_namespace, "delete", "machine", "probe", "--wait=false")
    yield f"{kube.release}-proxy"
    kube.helm("upgrade", kube.release, str(kube.chart), "--namespace", kube.release_namespace, "--reuse-values",
              "--set", "proxy.enabled=false", "--wait", "--timeout", "120s")


def test_the_proxy_may_set_a_machines_state_and_nothing_else(kube, namespace, proxy_installed, tmp_path):
    kube.apply({"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine", "metadata": {"name": "m1", "namespace": namespace},
                "spec": {"app": "web", "region": "ams", "image": "nginx:1.27", "state": "stopped"}})
    proxy = token_kubeconfig(kube, proxy_installed, tmp_path / "proxy")

    def patch(body: dict) -> subprocess.CompletedProcess:
        return as_sa(proxy, "-n", namespace, "patch", "machine", "m1", "--type=merge", "-p", json.dumps(body))

    ok = patch({"spec": {"state": "started"}})  # what autostart sends (kubefly.proxy.starters)
    assert ok.returncode == 0, ok.stderr
    assert kube.get(namespace, "machine", "m1")["spec"]["state"] == "started"

    image = patch({"spec": {"image": "evil:latest"}})
    assert image.returncode != 0
    assert "the proxy may only change a Machine's spec.state, not the rest of spec" in image.stderr
    both = patch({"spec": {"state": "stopped", "env": {"X": "1"}}})
    assert "not the rest of spec" in both.stderr
    label = patch({"metadata": {"labels": {"kubefly.dev/app": "other"}}})
    assert "not its labels, annotations, finalizers or owners" in label.stderr
    machine = kube.get(namespace, "machine", "m1")
    assert machine["spec"]["image"] == "nginx:1.27" and machine["spec"]["state"] == "started"
    assert "env" not in machine["spec"] and machine["metadata"].get("labels", {}).get("kubefly.dev/app") != "other"

    # RBAC already refuses the rest; the policy would too.
    assert "forbidden" in as_sa(proxy, "-n", namespace, "delete", "machine", "m1").stderr.lower()
    status = as_sa(proxy, "-n", namespace, "patch", "machine", "m1", "--subresource=status", "--type=merge",
                   "-p", '{"status": {"state": "started"}}')
    assert status.returncode != 0 and "forbidden" in status.stderr.lower()


UID = "0123456789abcdef"  # the Volume's uid, in the PV's kubefly.dev/volume-uid annotation


def _pv(name: str, path: str, labels: dict[str, str] | None, namespace: str = "org-x") -> str:
    pv = objects.build_pv(namespace=namespace, volume="data", uid=UID, app="web", region="ams",
                          host="kubefly-worker", size_gb=1)
    pv["metadata"]["name"] = name
    pv["spec"]["hostPath"]["path"] = path
    if labels is not None:
        pv["metadata"]["labels"] = labels
    return json.dumps(pv)


def test_the_operator_creates_only_kubeflys_hostpath_volumes_under_the_root(kube, tmp_path):
    operator = token_kubeconfig(kube, kube.service_account, tmp_path / "operator")
    good_labels = json.loads(_pv("x", "/", None))["metadata"]["labels"]
    try:
        outside = as_sa(operator, "create", "-f", "-", input=_pv("kf-lp-etc", "/etc", None))
        assert outside.returncode != 0
        assert "may only mount /var/lib/kubefly/volumes/<namespace>/<volume>" in outside.stderr and "not /etc" in outside.stderr
        # Under the root but not the volume's own directory: the whole root, or another org's volume.
        # Another Volume's directory of the same name (its own uid) is refused too.
        for path in (objects.HOST_ROOT, f"{objects.HOST_ROOT}/org-y/data", f"{objects.HOST_ROOT}/org-x/../../../../etc",
                     objects.host_path("org-x", "data", "another-uid"), objects.host_path("org-y", "data", UID)):
            refused = as_sa(operator, "create", "-f", "-", input=_pv("kf-lp-other", path, None))
            assert refused.returncode != 0, path
        unlabelled = as_sa(operator, "create", "-f", "-", input=_pv("kf-lp-bare", objects.host_path("org-x", "data", UID), {}))
        assert unlabelled.returncode != 0
        assert "labelled app.kubernetes.io/managed-by=kubefly" in unlabelled.stderr
        partly = {k: v for k, v in good_labels.items() if k != "kubefly.dev/host"}
        assert as_sa(operator, "create", "-f", "-", input=_pv("kf-lp-part", objects.host_path("org-x", "data", UID), partly)).returncode != 0

        # What the Volume planner builds is admitted (test_volumes.py runs the real controller).
        good = as_sa(operator, "create", "-f", "-", input=_pv("kf-lp-good", objects.host_path("org-x", "data", UID), None))
        assert good.returncode == 0, good.stderr
        relabel = as_sa(operator, "label", "pv", "kf-lp-good", "app.kubernetes.io/managed-by-")
        assert relabel.returncode != 0 and "labelled app.kubernetes.io/managed-by=kubefly" in relabel.stderr
        assert as_sa(operator, "delete", "pv", "kf-lp-good", "--wait=false").returncode == 0

        # A PV that is not kubefly's is neither changed nor deleted by the operator.
        kube.kubectl("create", "-f", "-", input=_pv("kf-lp-foreign", "/srv/other", {"owner": "someone"}))
        assert "labelled app.kubernetes.io/managed-by=kubefly" in as_sa(operator, "delete", "pv", "kf-lp-foreign", "--wait=false").stderr
        assert kube.kubectl("get", "pv", "kf-lp-foreign", check=False).returncode == 0
    finally:
        kube.kubectl("delete", "pv", "kf-lp-etc", "kf-lp-other", "kf-lp-bare", "kf-lp-part", "kf-lp-good", "kf-lp-foreign",
                     "--ignore-not-found", "--wait=false")


def test_the_operator_reads_secrets_by_name_and_never_lists_or_deletes_them(kube):
    user = f"system:serviceaccount:{kube.release_namespace}:{kube.service_account}"

    def can(verb: str, resource: str) -> str:
        return kube.kubectl("auth", "can-i", verb, resource, "--as", user, "-A", check=False).stdout.strip()

    assert [can(v, "secrets") for v in ("get", "create", "patch")] == ["yes"] * 3
    assert [can(v, "secrets") for v in ("list", "watch", "delete")] == ["no"] * 3
    assert [can(v, "persistentvolumes") for v in ("list", "watch")] == ["no"] * 2


def test_the_agent_writes_pod_status_only_on_its_own_host(kube, namespace, tmp_path):
    agents = json.loads(kube.kubectl("-n", kube.release_namespace, "get", "pods", "-l",
                                     "app.kubernetes.io/component=agent", "-o", "json").stdout)["items"]
    agents = [a for a in agents if a["spec"].get("nodeName")]
    assert len(agents) >= 2, "the kwok tier runs an agent on every worker"
    mine, other = agents[0]["spec"]["nodeName"], agents[1]["spec"]["nodeName"]
    kube.wait_for("the namespace's default ServiceAccount",
                  lambda: kube.kubectl("-n", namespace, "get", "serviceaccount", "default", check=False).returncode == 0)
    for name, host in (("here", mine), ("there", other)):
        kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
                    "spec": {"nodeName": host, "containers": [{"name": "c", "image": "nginx:1.27"}]}})
    sa = f"{kube.release}-agent"
    bound = token_kubeconfig(kube, sa, tmp_path / "agent", "--bound-object-kind", "Pod",
                             "--bound-object-name", agents[0]["metadata"]["name"])
    unbound = token_kubeconfig(kube, sa, tmp_path / "agent-unbound")
    gate = {"status": {"conditions": [{"type": "kubefly.dev/checks", "status": "True"}]}}

    def write(kubeconfig: Path, pod: str) -> str:
        """The agent's own call (kubefly.gossip.sources): "" when written, else the API's refusal."""
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException

        api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        try:
            api.patch_namespaced_pod_status(pod, namespace, gate, _content_type="application/strategic-merge-patch+json")
        except ApiException as exc:
            assert exc.status in (403, 422), exc
            return exc.body
        return ""

    assert write(bound, "here") == ""
    there = write(bound, "there")
    assert f"the agent may only write the status of pods on its own host ({mine}), not of a pod on {other}" in there
    # A token not bound to a pod on a host names no host: it writes nothing.
    assert "its token names no host" in write(unbound, "here")
