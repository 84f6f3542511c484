"""The real API server refuses bad kubefly objects, naming the field (CRD schema + CEL rules).

Each case is a manifest and a substring the refusal must contain; transition
rules (immutable fields, sizes that only grow) create an object then update it.
"""

from __future__ import annotations

import copy
import json

import pytest

from kubefly import API_VERSION


def obj(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def machine(name: str = "web-1", **spec) -> dict:
    return obj("Machine", name, {"app": "web", "region": "ams", "image": "nginx:1.27", **spec})


def volume(name: str = "data", **spec) -> dict:
    return obj("Volume", name, {"app": "web", "region": "ams", "sizeGb": 10, **spec})


def appsecret(name: str = "web-secrets", **spec) -> dict:
    return obj("AppSecret", name, {"app": "web", "data": {"DATABASE_URL": "c2VhbGVk"}, **spec})


def postgres(name: str = "db", **spec) -> dict:
    return obj("PostgresCluster", name, {"app": "db", "region": "ams", **spec})


def service(**concurrency) -> dict:
    return {"internalPort": 8080, "ports": [{"port": 443, "handlers": ["tls", "http"]}], "concurrency": concurrency}


def apply(kube, namespace: str, manifest: dict, check: bool = True):
    return kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=check)


def get(kube, namespace: str, manifest: dict) -> dict:
    out = kube.kubectl("get", "-n", namespace, manifest["kind"].lower(), manifest["metadata"]["name"], "-o", "json")
    return json.loads(out.stdout)


INVALID = {
    "machine-memory-not-multiple-of-256": (machine(guest={"memoryMb": 300}), "spec.guest.memoryMb"),
    "machine-too-many-cpus": (machine(guest={"cpus": 32}), "spec.guest.cpus"),
    "machine-unknown-cpu-kind": (machine(guest={"cpuKind": "gpu"}), "spec.guest.cpuKind"),
    "machine-soft-above-hard-limit": (
        machine(services=[service(softLimit=50, hardLimit=10)]),
        "spec.services[0].concurrency.softLimit",
    ),
    "machine-two-mounts": (
        machine(mounts=[{"volume": "a", "path": "/a"}, {"volume": "b", "path": "/b"}]),
        "spec.mounts",
    ),
    "machine-duplicate-check-names": (
        machine(checks=[{"name": "alive", "type": "tcp", "port": 80}, {"name": "alive", "type": "http", "port": 80}]),
        "spec.checks names must be unique",
    ),
    "machine-bad-stop-signal": (machine(stop={"signal": "SIGHUP"}), "spec.stop.signal"),
    # Nothing in the container can SIGKILL its PID 1, and the kubelet sends SIGTERM first: refused.
    "machine-stop-signal-sigkill": (machine(stop={"signal": "SIGKILL"}), "spec.stop.signal"),
    "machine-stop-timeout-too-long": (machine(stop={"timeoutSeconds": 301}), "spec.stop.timeoutSeconds"),
    "machine-app-not-dns-label": (machine(app="My_App"), "spec.app"),
    "machine-name-too-long-for-a-label": (machine(name="m" * 70), "metadata.name must be a DNS label"),
    "machine-unknown-restart-policy": (machine(restart={"policy": "sometimes"}), "spec.restart.policy"),
    # `autostop: off` unquoted in YAML is a boolean; the server says which field.
    "machine-autostop-boolean": (
        machine(services=[{"internalPort": 8080, "autostop": False}]),
        "spec.services[0].autostop",
    ),
    "machine-env-name-empty": (machine(env={"": "x"}), "spec.env names must be"),
    "machine-env-name-with-equals": (machine(env={"A=B": "x"}), "spec.env names must be"),
    "machine-env-name-with-newline": (machine(env={"A\nB": "x"}), "spec.env names must be"),
    "machine-image-with-whitespace": (machine(image="nginx:1.27 --privileged"), "spec.image"),
    "machine-image-with-newline": (machine(image="nginx:1.27\n"), "spec.image"),
    "machine-mount-over-proc": (machine(mounts=[{"volume": "a", "path": "/proc"}]), "spec.mounts[].path must not"),
    "machine-mount-under-sys": (machine(mounts=[{"volume": "a", "path": "/sys/fs/cgroup"}]), "spec.mounts[].path must not"),
    "machine-mount-over-the-token": (
        machine(mounts=[{"volume": "a", "path": "/var/run/secrets/kubernetes.io/serviceaccount"}]),
        "spec.mounts[].path must not",
    ),
    "machine-mount-with-dotdot": (machine(mounts=[{"volume": "a", "path": "/data/../proc"}]), "spec.mounts[].path must not"),
    "machine-mount-double-slash": (machine(mounts=[{"volume": "a", "path": "//proc"}]), "spec.mounts[0].path"),
    "machine-check-path-crlf": (
        machine(checks=[{"name": "h", "type": "http", "port": 80, "path": "/x\r\nHost: evil"}]), "spec.checks[0].path",
    ),
    "machine-check-header-value-crlf": (
        machine(checks=[{"name": "h", "type": "http", "port": 80, "headers": {"X": "a\r\nB: c"}}]),
        "spec.checks[0].headers.X",
    ),
    "machine-check-header-name-not-a-token": (
        machine(checks=[{"name": "h", "type": "http", "port": 80, "headers": {"X: y": "a"}}]),
        "spec.checks[].headers names must be HTTP tokens",
    ),
    # suspend is not built: refused by the API server, not run as stop.
    "machine-autostop-suspend": (
        machine(services=[{"internalPort": 8080, "autostop": "suspend"}]),
        "spec.services[].autostop: suspend is not supported",
    ),
    "machine-missing-image": (obj("Machine", "no-image", {"app": "web", "region": "ams"}), "spec.image"),
    "volume-too-small": (volume(sizeGb=0), "spec.sizeGb"),
    "volume-too-big": (volume(sizeGb=501), "spec.sizeGb"),
    "volume-snapshot-retention-too-long": (volume(snapshotRetention=61), "spec.snapshotRetention"),
    "volume-snapshots-more-than-hourly": (volume(snapshotIntervalHours=0), "spec.snapshotIntervalHours"),
    "volume-two-sources": (volume(forkFrom="other", restoreFrom="snap"), "spec.restoreFrom and spec.forkFrom are exclusive"),
    "snapshot-without-volume": (obj("Snapshot", "s1", {}), "spec.volume"),
    "appsecret-key-not-env-name": (appsecret(data={"1BAD-KEY": "c2VhbGVk"}), "spec.data keys must be environment"),
    "appsecret-value-not-base64": (appsecret(data={"TOKEN": "plain text!"}), "spec.data.TOKEN"),
    "postgres-too-many-members": (postgres(members=8), "spec.members"),
    "postgres-unsupported-version": (postgres(version=16), "spec.version"),
    "postgres-synchronous-single-member": (postgres(members=1, synchronous=True), "spec.synchronous"),
    "postgres-unknown-delete-policy": (postgres(deletePolicy="nuke"), "spec.deletePolicy"),
}


@pytest.mark.parametrize("manifest,expected", INVALID.values(), ids=INVALID.keys())
def test_invalid_object_is_refused(kube, namespace, manifest, expected):
    proc = apply(kube, namespace, manifest, check=False)
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    assert expected in proc.stderr


def _update(manifest: dict, **spec) -> dict:
    out = copy.deepcopy(manifest)
    out["spec"].update(spec)
    return out


TRANSITIONS = {
    "machine-app-immutable": (machine(), {"app": "other"}, "spec.app is immutable"),
    "machine-region-immutable": (machine(), {"region": "iad"}, "spec.region is immutable"),
    "machine-mount-added": (machine(), {"mounts": [{"volume": "data", "path": "/data"}]}, "spec.mounts is immutable"),
    "machine-mount-swapped": (
        machine(mounts=[{"volume": "data", "path": "/data"}]),
        {"mounts": [{"volume": "other", "path": "/data"}]},
        "spec.mounts is immutable",
    ),
    "volume-shrinks": (volume(), {"sizeGb": 5}, "spec.sizeGb may only grow"),
    "volume-region-immutable": (volume(), {"region": "syd"}, "spec.region is immutable"),
    "volume-fork-from-added": (volume(), {"forkFrom": "other"}, "can only be set when a Volume is created"),
    "volume-restore-from-added": (volume(), {"restoreFrom": "snap"}, "can only be set when a Volume is created"),
    "volume-fork-from-changed": (volume(forkFrom="a"), {"forkFrom": "b"}, "spec.forkFrom is immutable"),
    "snapshot-volume-immutable": (obj("Snapshot", "s1", {"volume": "a"}), {"volume": "b"}, "spec.volume is immutable"),
    "appsecret-app-immutable": (appsecret(), {"app": "other"}, "spec.app is immutable"),
    "postgres-region-immutable": (postgres(), {"region": "iad"}, "spec.region is immutable"),
    "postgres-volume-shrinks": (postgres(volumeSizeGb=20), {"volumeSizeGb": 10}, "spec.volumeSizeGb may only grow"),
}


@pytest.mark.parametrize("manifest,change,expected", TRANSITIONS.values(), ids=TRANSITIONS.keys())
def test_invalid_update_is_refused(kube, namespace, manifest, change, expected):
    if source := manifest["spec"].get("forkFrom"):
        # A fork's source must exist: the operator's admission webhook refuses a fork of nothing.
        apply(kube, namespace, volume(source))
    apply(kube, namespace, manifest)
    proc = apply(kube, namespace, _update(manifest, **change), check=False)
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    assert expected in proc.stderr


def test_valid_objects_get_defaults(kube, namespace):
    for manifest in (machine(services=[service(softLimit=10, hardLimit=20)]), volume(), appsecret(), postgres()):
        apply(kube, namespace, manifest)
    spec = get(kube, namespace, machine())["spec"]
    assert spec["guest"] == {"cpuKind": "shared", "cpus": 1, "memoryMb": 256}
    assert spec["restart"] == {"policy": "on-failure", "maxRetries": 10}
    assert spec["stop"] == {"signal": "SIGINT", "timeoutSeconds": 5}
    assert spec["state"] == "started"
    assert spec["services"][0]["autostop"] == "off" and spec["services"][0]["concurrency"]["type"] == "connections"
    vol = get(kube, namespace, volume())["spec"]
    assert (vol["snapshotRetention"], vol["scheduledSnapshots"], vol["snapshotIntervalHours"], vol["requireUniqueHost"]) == (5, True, 24, True)
    assert get(kube, namespace, appsecret())["spec"]["stage"] is False
    pg = get(kube, namespace, postgres())["spec"]
    assert (pg["members"], pg["version"], pg["deletePolicy"]) == (3, 15, "keepVolumes")


def test_allowed_updates(kube, namespace):
    apply(kube, namespace, volume())
    apply(kube, namespace, _update(volume(), sizeGb=20))
    assert get(kube, namespace, volume())["spec"]["sizeGb"] == 20
    apply(kube, namespace, machine(mounts=[{"volume": "data", "path": "/data"}]))
    apply(kube, namespace, machine(mounts=[{"volume": "data", "path": "/data"}], state="stopped",
                                   env={"A": "1", "my-var.x": "multi\nline"},
                                   checks=[{"name": "h", "type": "http", "port": 80, "path": "/health?x=1",
                                            "headers": {"Authorization": "Bearer a.b"}}]))
    assert get(kube, namespace, machine())["spec"]["state"] == "stopped"


def test_status_keeps_kopf_progress_and_still_types_known_fields(kube, namespace):
    # The operator is running during the session and owns the known status
    # fields; this checks the schema only: unknown fields (Kopf's) survive,
    # known ones are still validated.
    apply(kube, namespace, machine())
    progress = {"progress": {"create": {"retries": 1}}}
    kube.kubectl(
        "patch", "-n", namespace, "machine", "web-1", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"kopf": progress}}),
    )
    assert get(kube, namespace, machine())["status"]["kopf"] == progress
    proc = kube.kubectl(
        "patch", "-n", namespace, "machine", "web-1", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"state": "exploded"}}), check=False,
    )
    assert proc.returncode != 0 and "status.state" in proc.stderr


def test_printer_columns_and_category(kube, namespace):
    apply(kube, namespace, volume())
    out = kube.kubectl("get", "-n", namespace, "kubefly").stdout
    assert "volume.kubefly.dev/data" in out
    header = kube.kubectl("get", "-n", namespace, "vol").stdout.splitlines()[0].split()
    assert header == ["NAME", "APP", "REGION", "SIZE", "LIMIT", "HOST", "ATTACHED", "AGE"]
