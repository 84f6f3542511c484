"""Volume snapshots on kind, as a user takes them: kubectl applies a Snapshot of a running
Machine's volume, restic copies it from the host into the chart's bundled object store
(SeaweedFS), and a new Volume restores it on another host. The host-loss case (a fork
from the stored copy while the source's host is stopped) is in test_kind_disruption.py."""

from __future__ import annotations

import json
import subprocess

from .kindlib import RELEASE_NAMESPACE, KindCluster
from .test_kind_appsecrets import cond
from .test_kind_volumes import get, in_machine, started_or_mount_failure
from .test_kind_machines import machine

API = "kubefly.dev/v1alpha1"
CHECKSUM = "import hashlib; print(hashlib.sha256(open('/data/blob', 'rb').read()).hexdigest())"
WRITE = ("import os, hashlib; os.makedirs('/data/sub', exist_ok=True); b = os.urandom(1 << 20); "
         "open('/data/blob', 'wb').write(b); open('/data/sub/note', 'w').write('kept'); print(hashlib.sha256(b).hexdigest())")


def volume(name: str, app: str, region: str, **spec) -> dict:
    return {"apiVersion": API, "kind": "Volume", "metadata": {"name": name},
            "spec": {"app": app, "region": region, "sizeGb": 1, **spec}}


def snapshot(name: str, volume_name: str) -> dict:
    return {"apiVersion": API, "kind": "Snapshot", "metadata": {"name": name}, "spec": {"volume": volume_name}}


def with_volume(kind: KindCluster, name: str, app: str, region: str, vol: str) -> dict:
    m = machine(kind, name, region)
    m["spec"]["app"] = app
    m["spec"]["mounts"] = [{"volume": vol, "path": "/data"}]
    return m


def machine_with_data(kind: KindCluster, namespace: str, name: str, app: str, vol: str) -> tuple[str, str]:
    """A Volume in ams and a Machine writing 1 MiB into it: (the host, the data's checksum)."""
    kind.apply(volume(vol, app, "ams"), namespace)
    kind.apply(with_volume(kind, name, app, "ams", vol), namespace)
    m = kind.wait_for(f"{name} started with its volume", lambda: started_or_mount_failure(kind, namespace, name, 1), timeout=180)
    return m["status"]["host"], in_machine(kind, namespace, name, WRITE)


def finished(kind: KindCluster, namespace: str, name: str) -> dict | None:
    s = get(kind, namespace, "snapshot", name)
    return s if (s or {}).get("status", {}).get("phase") in ("Succeeded", "Failed") else None


def take(kind: KindCluster, namespace: str, name: str, volume_name: str) -> dict:
    kind.apply(snapshot(name, volume_name), namespace)
    s = kind.wait_for(f"snapshot {name} finished", lambda: finished(kind, namespace, name), timeout=180)
    assert s["status"]["phase"] == "Succeeded", s["status"].get("message")
    return s


def restic_snapshots(kind: KindCluster, repository: str) -> list[dict]:
    """The copies in a repository, listed by restic itself from the operator's pod (which has the store's Secret)."""
    operator = kind.kubectl("-n", RELEASE_NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/component=operator",
                            "-o", "jsonpath={.items[0].metadata.name}").stdout
    endpoint = kind.kubectl("-n", RELEASE_NAMESPACE, "exec", operator, "--", "printenv",
                            "KUBEFLY_OBJECT_STORE_ENDPOINT").stdout.strip()
    secret = lambda name, key: subprocess.run(  # noqa: E731
        ["base64", "-d"], input=kind.kubectl("-n", RELEASE_NAMESPACE, "get", "secret", name, "-o",
                                             f"jsonpath={{.data.{key}}}").stdout, capture_output=True, text=True).stdout
    env = [f"RESTIC_REPOSITORY=s3:{endpoint}/kubefly/{repository}",
           f"RESTIC_PASSWORD={secret('kubefly-snapshot-key', 'password')}",
           f"AWS_ACCESS_KEY_ID={secret('kubefly-objectstore-credentials', 'AWS_ACCESS_KEY_ID')}",
           f"AWS_SECRET_ACCESS_KEY={secret('kubefly-objectstore-credentials', 'AWS_SECRET_ACCESS_KEY')}",
           "RESTIC_CACHE_DIR=/tmp/restic-cache"]
    out = kind.kubectl("-n", RELEASE_NAMESPACE, "exec", operator, "--", "env", *env, "restic", "snapshots", "--json").stdout
    return json.loads(out or "[]")


def test_a_snapshot_of_a_running_machine_is_frozen_consistent_restores_on_another_host_and_leaves_the_store_when_deleted(
        kind: KindCluster, namespace: str):
    host, digest = machine_with_data(kind, namespace, "snap-1", "snap", "snapsrc")

    first = take(kind, namespace, "snap-a", "snapsrc")["status"]
    print(f"[kind] first snapshot: {first['bytes']} bytes in {first['durationSeconds']} s, frozen {first['frozenSeconds']} s")
    assert first["host"] == host and first["bytes"] >= 1 << 20
    # The Machine ran: the final pass was read with its pod's cgroup frozen, and briefly.
    assert first["consistency"] == "crash-consistent", first
    assert first["frozenSeconds"] < 10
    assert "snap-a" in kind.kubectl("-n", namespace, "get", "snapshots").stdout

    # Nothing changed: the second copy is incremental, all deduplicated.
    second = take(kind, namespace, "snap-b", "snapsrc")["status"]
    print(f"[kind] incremental snapshot: {second['durationSeconds']} s, {second['addedBytes']} bytes new")
    assert second["addedBytes"] < first["addedBytes"] // 4

    # Restored into a new Volume of the same app: placement spreads an app's volumes, so it lands on
    # another ams host, and the Machine there reads the same bytes.
    kind.apply(volume("snaprestored", "snap", "ams", restoreFrom="snap-a"), namespace)
    v = kind.wait_for("the restored volume is Ready", lambda: (cond(v := get(kind, namespace, "volume", "snaprestored") or {},
                                                                    "Ready") or {}).get("status") == "True" and v, timeout=180)
    assert v["status"]["restoredFrom"]["snapshot"] == "snap-a" and cond(v, "Restored")["status"] == "True"
    assert v["status"]["host"] != host
    print(f"[kind] restore: {v['status']['restoredFrom']['durationSeconds']} s on host {v['status']['host']}")
    kind.apply(with_volume(kind, "snap-2", "snap", "ams", "snaprestored"), namespace)
    kind.wait_for("snap-2 started on the restored volume", lambda: started_or_mount_failure(kind, namespace, "snap-2", 1), timeout=180)
    assert in_machine(kind, namespace, "snap-2", CHECKSUM) == digest
    assert in_machine(kind, namespace, "snap-2", "print(open('/data/sub/note').read())") == "kept"
    # The app (non-root) may write the restored volume as it could the original.
    in_machine(kind, namespace, "snap-2", "open('/data/new', 'w').write('x')")

    # A Snapshot deleted is gone from the store too; the other copy stays.
    ids = {s["short_id"] for s in restic_snapshots(kind, first["repository"])}
    assert {first["snapshotId"][:8], second["snapshotId"][:8]} <= ids, ids
    kind.kubectl("-n", namespace, "delete", "snapshot", "snap-b", "--wait=true", "--timeout=120s", timeout=150)
    ids = {s["short_id"] for s in restic_snapshots(kind, first["repository"])}
    assert first["snapshotId"][:8] in ids and second["snapshotId"][:8] not in ids, ids


def test_a_restore_from_another_apps_snapshot_is_refused_naming_the_field(kind: KindCluster, namespace: str):
    kind.apply(volume("other", "snapother", "syd"), namespace)
    kind.wait_for("volume other Ready", lambda: (cond(get(kind, namespace, "volume", "other") or {}, "Ready") or {})
                  .get("status") == "True", timeout=120)
    take(kind, namespace, "other-a", "other")
    # Refused by the API server (the operator's admission webhook): kubectl says why, nothing is made.
    refused = kind.kubectl("apply", "-n", namespace, "-f", "-", check=False,
                           input=json.dumps(volume("thief", "snapthief", "syd", restoreFrom="other-a")))
    assert refused.returncode != 0, refused.stdout
    assert "spec.restoreFrom" in refused.stderr and "app snapother" in refused.stderr, refused.stderr
    assert get(kind, namespace, "volume", "thief") is None, "nothing a Machine could mount"
