"""Pure parts of Volume snapshots: the object store, the restic pods, schedules and fork sources.

Every Volume has a restic repository of its own in the store's bucket,
`volumes/<namespace>/<volume>.<uid>` (the uid, as for its host directory: a
Volume re-created under an old name never shares a predecessor's copies). All
repositories are encrypted with the platform's snapshot key, a Secret in the
operator's namespace that organisations never see; the pods that run restic
live there too. Three pods, all on kubefly's image (`kubefly.volumes.resticjob`):

- snapshot: on the Volume's host, the directory mounted read-only; with a
  running Machine, the host's cgroup tree too, to freeze its pod for the
  second, consistent pass;
- restore: on the new Volume's host, into its (new, empty) directory;
- forget: anywhere; drops one copy and prunes what nothing else references.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from kubefly.labels import HOST, VOLUME
from kubefly.volumes.objects import NAMESPACE_LABEL

KEY_SECRET = "kubefly-snapshot-key"
KEY_FIELD = "password"
ROLE = "kubefly.dev/role"
SNAPSHOT_ROLE, RESTORE_ROLE, FORGET_ROLE = "volume-snapshot", "volume-restore", "snapshot-forget"
FORK_OF = "kubefly.dev/fork-for"
MOUNT = "/volume"
CGROUP_MOUNT = "/host-cgroup"
HOST_CGROUP = "/sys/fs/cgroup"
JOB_DEADLINE_S = 3600


@dataclass(frozen=True)
class ObjectStore:
    """Where copies go: an S3 endpoint, a bucket and the Secret with its credentials (chart values objectStore.*)."""

    endpoint: str
    bucket: str
    credentials_secret: str
    region: str = ""
    bundled: bool = False
    # How a Postgres member (pgBackRest 2.45 speaks S3 only over TLS) reaches the store: its
    # https:// endpoint (None: there is none) and the Secret whose ca.crt certifies it (None:
    # the system's trust store). Bundled: its Service's port 8443, certified by the operator's CA.
    https_endpoint: str | None = None
    ca_secret: str | None = None
    service: str = ""  # the bundled store's Service, which its certificate names

    @classmethod
    def from_env(cls, environ=os.environ) -> "ObjectStore | None":
        endpoint = environ.get("KUBEFLY_OBJECT_STORE_ENDPOINT", "").strip().rstrip("/")
        if not endpoint:
            return None
        bundled = environ.get("KUBEFLY_OBJECT_STORE_BUNDLED", "").strip().lower() == "true"
        if bundled:  # the chart names the TLS port and its CA (docs/objectstore.md)
            https = environ.get("KUBEFLY_OBJECT_STORE_HTTPS_ENDPOINT", "").strip().rstrip("/") or None
            ca_secret = environ.get("KUBEFLY_OBJECT_STORE_CA_SECRET", "").strip() or None
        else:  # an external store is reached as it is, trusted by the system's CAs
            https, ca_secret = (endpoint if endpoint.startswith("https://") else None), None
        return cls(
            endpoint=endpoint,
            bucket=environ.get("KUBEFLY_OBJECT_STORE_BUCKET", "").strip() or "kubefly",
            credentials_secret=environ.get("KUBEFLY_OBJECT_STORE_SECRET", "").strip() or "kubefly-objectstore-credentials",
            region=environ.get("KUBEFLY_OBJECT_STORE_REGION", "").strip(),
            bundled=bundled,
            https_endpoint=https,
            ca_secret=ca_secret,
            service=environ.get("KUBEFLY_OBJECT_STORE_SERVICE", "").strip() if bundled else "",
        )

    def url(self, repository: str) -> str:
        return f"s3:{self.endpoint}/{self.bucket}/{repository}"


NOT_CONFIGURED = ("the platform has no object store: set the chart's objectStore.endpoint (or objectStore.bundled.enabled) "
                  "so snapshots have somewhere to go")


def repository(namespace: str, volume: str, uid: str) -> str:
    return f"volumes/{namespace}/{volume}.{uid}"


def snapshot_pod_name(uid: str) -> str:
    return f"snapshot-{uid}"


def restore_pod_name(volume_uid: str) -> str:
    return f"volume-restore-{volume_uid}"


def forget_pod_name(uid: str) -> str:
    return f"snapshot-forget-{uid}"


def _env(store: ObjectStore, repo: str) -> list[dict]:
    env = [
        {"name": "RESTIC_REPOSITORY", "value": store.url(repo)},
        {"name": "RESTIC_PASSWORD", "valueFrom": {"secretKeyRef": {"name": KEY_SECRET, "key": KEY_FIELD}}},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": store.credentials_secret, "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": store.credentials_secret, "key": "AWS_SECRET_ACCESS_KEY"}}},
        # The pod's root is read-only; restic keeps its cache and lock bookkeeping here.
        {"name": "RESTIC_CACHE_DIR", "value": "/tmp/restic-cache"},
        {"name": "HOME", "value": "/tmp"},
    ]
    if store.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": store.region})
    return env


def _pod(*, name: str, home: str, role: str, labels: dict, annotations: dict, host: str | None, args: list[str],
         store: ObjectStore, repo: str, image: str, run_as_root: bool, capabilities: list[str],
         mounts: list[tuple[str, str, str, bool]]) -> dict:
    """mounts: (name, host path, container path, read-only), hostPath volumes."""
    spec: dict = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "activeDeadlineSeconds": JOB_DEADLINE_S,
        "containers": [{
            "name": "restic",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["/opt/kubefly/bin/python", "-m", "kubefly.volumes.resticjob", *args],
            "env": _env(store, repo),
            "securityContext": {
                "runAsUser": 0 if run_as_root else 65532,
                "runAsGroup": 0 if run_as_root else 65532,
                "runAsNonRoot": not run_as_root,
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"], "add": capabilities},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
                            + [{"name": n, "mountPath": c, "readOnly": ro} for n, _, c, ro in mounts],
        }],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
                   + [{"name": n, "hostPath": {"path": h, "type": "DirectoryOrCreate" if n == "volume" else "Directory"}}
                      for n, h, _, _ in mounts],
    }
    if host:
        # On that host whatever its taints: the data is there and nowhere else.
        spec["nodeName"] = host
        spec["tolerations"] = [{"operator": "Exists"}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": home, "labels": {ROLE: role, **labels}, "annotations": annotations},
            "spec": spec}


def build_snapshot_pod(*, home: str, store: ObjectStore, image: str, snapshot: str, snapshot_uid: str, namespace: str,
                       volume: str, volume_uid: str, host: str, path: str, machine_pod_uid: str | None) -> dict:
    """The pod copying `path` on `host`; with machine_pod_uid, that running pod is frozen for the final pass."""
    args = ["backup", MOUNT, "--host-id", volume_uid, "--tag", f"snapshot={snapshot}"]
    mounts = [("volume", path, MOUNT, True)]
    capabilities = ["DAC_READ_SEARCH"]  # read an app's files of any owner and mode
    if machine_pod_uid:
        args += ["--freeze-pod", machine_pod_uid, "--cgroup-root", CGROUP_MOUNT]
        mounts.append(("cgroup", HOST_CGROUP, CGROUP_MOUNT, False))
        capabilities.append("DAC_OVERRIDE")  # the freezer files are root's, 0644 on v1 hierarchies
    return _pod(name=snapshot_pod_name(snapshot_uid), home=home, role=SNAPSHOT_ROLE,
                labels={VOLUME: volume, NAMESPACE_LABEL: namespace, HOST: host},
                annotations={"kubefly.dev/snapshot": f"{namespace}/{snapshot}"}, host=host, args=args, store=store,
                repo=repository(namespace, volume, volume_uid), image=image, run_as_root=True,
                capabilities=capabilities, mounts=mounts)


def build_restore_pod(*, home: str, store: ObjectStore, image: str, repo: str, snapshot_id: str | None, namespace: str,
                      volume: str, volume_uid: str, host: str, path: str, name: str | None = None,
                      since: str | None = None, snapshot: str | None = None) -> dict:
    """The pod restoring copy `snapshot_id` of repository `repo` into the Volume's directory `path` on `host`
    (a new Volume's, or a migration's target); `since`: the directory holds that copy, bring only the changes.
    Without an id, the copy of Snapshot `snapshot` is waited for (it is being taken meanwhile)."""
    which = ["--snapshot", snapshot_id] if snapshot_id else ["--wait-for-tag", f"snapshot={snapshot}"]
    args = ["restore", MOUNT, *which] + (["--since", since] if since else [])
    return _pod(name=name or restore_pod_name(volume_uid), home=home, role=RESTORE_ROLE,
                labels={VOLUME: volume, NAMESPACE_LABEL: namespace, HOST: host},
                annotations={"kubefly.dev/volume-uid": volume_uid}, host=host,
                args=args, store=store, repo=repo, image=image, run_as_root=True,
                # Files come back with their owners and modes.
                capabilities=["CHOWN", "FOWNER", "DAC_OVERRIDE"], mounts=[("volume", path, MOUNT, False)])


def build_forget_pod(*, home: str, store: ObjectStore, image: str, repo: str, snapshot_id: str, snapshot_uid: str,
                     namespace: str, snapshot: str) -> dict:
    return _pod(name=forget_pod_name(snapshot_uid), home=home, role=FORGET_ROLE, labels={NAMESPACE_LABEL: namespace},
                annotations={"kubefly.dev/snapshot": f"{namespace}/{snapshot}"}, host=None,
                args=["forget", "--snapshot", snapshot_id], store=store, repo=repo, image=image, run_as_root=False,
                capabilities=[], mounts=[])


# ---- reading a finished pod ---------------------------------------------------


@dataclass(frozen=True)
class JobOutcome:
    state: Literal["running", "succeeded", "failed"]
    result: dict
    message: str


def outcome(pod: dict) -> JobOutcome:
    """The pod's phase and the JSON its job wrote to the termination message."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    terminated, waiting = {}, {}
    for cs in status.get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated") or terminated
        waiting = (cs.get("state") or {}).get("waiting") or waiting
    raw = (terminated.get("message") or "").strip()
    try:
        result = json.loads(raw) if raw.startswith("{") else {}
    except ValueError:
        result = {}
    if phase == "Succeeded":
        return JobOutcome("succeeded", result, "done")
    if phase == "Failed":
        why = result.get("error") or raw or status.get("reason") or terminated.get("reason") or "failed"
        return JobOutcome("failed", result, str(why)[:2000])
    detail = " ".join(x for x in (waiting.get("reason"), waiting.get("message")) if x)
    return JobOutcome("running", result, f"{phase}{f' ({detail})' if detail else ''}")


# ---- schedules and retention ---------------------------------------------------


def scheduled_name(volume: str, slot: datetime) -> str:
    """One name per Volume and slot, so two operator runs in the same slot make one Snapshot."""
    return f"{volume[:49]}-{slot.strftime('%Y%m%d%H%M')}"


def next_slot(*, interval_hours: int, since: datetime) -> datetime:
    return since + timedelta(hours=interval_hours)


def due_slot(*, interval_hours: int, last: datetime | None, placed: datetime, now: datetime) -> datetime | None:
    """The slot a scheduled snapshot is due for now, or None: one interval after the last one (or placement)."""
    due = next_slot(interval_hours=interval_hours, since=last or placed)
    return due if now >= due else None


def slot_taken(*, slot: datetime, now: datetime, interval_hours: int) -> datetime:
    """What the schedule counts from after taking `slot`: the slot, or now if it was missed by a whole interval
    (an operator down for a day takes one snapshot when it is back, not one per missed slot)."""
    return slot if now - slot < timedelta(hours=interval_hours) else now


def schedule_condition(*, store_configured: bool, enabled: bool, interval_hours: int, retention_days: int,
                       next_at: str | None) -> tuple[str, bool, str, str]:
    if not enabled:
        return ("SnapshotsScheduled", False, "Disabled", "spec.scheduledSnapshots is false: snapshots are taken on demand only")
    if not store_configured:
        return ("SnapshotsScheduled", False, "ObjectStoreNotConfigured", NOT_CONFIGURED)
    every = "daily" if interval_hours == 24 else f"every {interval_hours} h"
    when = f"; next at {next_at}" if next_at else ""
    return ("SnapshotsScheduled", True, "Scheduled", f"{every}, each kept {retention_days} days{when}")


def expires_at(taken: datetime, retention_days: int) -> datetime:
    return taken + timedelta(days=retention_days)


# ---- where a new Volume's data comes from --------------------------------------


@dataclass(frozen=True)
class StoredCopy:
    """A Snapshot that succeeded: enough to restore it, even after its Volume is gone."""

    name: str
    volume: str
    volume_uid: str
    app: str
    region: str
    size_gb: int
    repository: str
    snapshot_id: str
    taken_at: datetime
    host: str

    @classmethod
    def of(cls, snap: dict) -> "StoredCopy | None":
        st = snap.get("status") or {}
        needed = ("volumeUid", "repository", "snapshotId", "takenAt")
        if st.get("phase") != "Succeeded" or any(not st.get(k) for k in needed):
            return None
        return cls(name=snap["metadata"]["name"], volume=(snap.get("spec") or {}).get("volume", ""),
                   volume_uid=st["volumeUid"], app=st.get("app") or "", region=st.get("region") or "",
                   size_gb=int(st.get("sizeGb") or 1), repository=st["repository"], snapshot_id=st["snapshotId"],
                   taken_at=datetime.fromisoformat(str(st["takenAt"]).replace("Z", "+00:00")), host=st.get("host") or "")


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


def check_source(*, app: str, region: str, size_gb: int, source_app: str, source_region: str, source_size_gb: int,
                 what: str) -> Refusal | None:
    """A restore or fork copies data within one app and region, into at least as much room."""
    if source_app != app:
        return Refusal("OtherApp", f"{what} belongs to app {source_app}, not {app}: a volume restores only its own app's data")
    if source_region != region:
        return Refusal("OtherRegion", f"{what} is in region {source_region}, not {region}: create the new Volume in "
                       f"region {source_region} (copies are restored within their region)")
    if size_gb < source_size_gb:
        return Refusal("TooSmall", f"spec.sizeGb {size_gb} is smaller than {what}'s {source_size_gb} GB: "
                       f"set spec.sizeGb to at least {source_size_gb}")
    return None


@dataclass(frozen=True)
class ForkPlan:
    """fresh: take a new snapshot of the source now; stored: restore `copy`; refused: say why."""

    kind: Literal["fresh", "stored", "refused"]
    copy: StoredCopy | None = None
    refusal: Refusal | None = None


def plan_fork(*, source: str, source_uid: str, source_host_ready: bool, copies: list[StoredCopy]) -> ForkPlan:
    """The freshest copy of the source Volume: a new one while its host is up, else the newest stored one."""
    if source_host_ready:
        return ForkPlan("fresh")
    mine = sorted((c for c in copies if c.volume_uid == source_uid), key=lambda c: c.taken_at)
    if not mine:
        return ForkPlan("refused", refusal=Refusal(
            "NoSnapshot", f"volume {source}'s host is down and it has no stored snapshot: nothing to fork from until "
                          f"the host returns"))
    return ForkPlan("stored", copy=mine[-1])
