"""A new Volume's data from a copy: spec.restoreFrom (a Snapshot) or spec.forkFrom (a Volume).

Called by the Volume's reconcile between placement and its claim: the claim is
made only once the data is in the directory, so no Machine mounts a volume
that is still being filled. The copy is restored by a pod on the new host
(kubefly.volumes.snapshots.build_restore_pod) into the Volume's own directory.
A fork takes a fresh snapshot of its source while the source's host is up, and
restores the newest stored one when it is down; status.restoredFrom says which
and how old the data is.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

import kopf

from kubefly import GROUP, VERSION
from kubefly.conditions import get_condition, is_ready, rfc3339
from kubefly.controllers.common import condition_patch, home_namespace, update_status
from kubefly.controllers.kubeapi import core_path, custom_path, kube
from kubefly.controllers.main import VOLUME_COPY_BYTES, VOLUME_COPY_SECONDS
from kubefly.machines.volume_prep import IMAGE_ENV
from kubefly.volumes import objects, snapshots

CONDITION = "Restored"


def source_of(spec: dict) -> str | None:
    return spec.get("restoreFrom") or spec.get("forkFrom")


async def avoid_host(body: dict) -> str | None:
    """The host a fork must not share with its source (spec.requireUniqueHost), if any."""
    spec = body["spec"]
    if not spec.get("forkFrom") or not spec.get("requireUniqueHost", True):
        return None
    source = await kube().get(custom_path(body["metadata"]["namespace"], "volumes", spec["forkFrom"]), missing_ok=True)
    return ((source or {}).get("status") or {}).get("host")


async def _hold(body: dict, reason: str, message: str, delay: float) -> None:
    meta = body["metadata"]
    await update_status("volumes", meta["namespace"], meta["name"], lambda b: condition_patch(
        b, [(CONDITION, False, reason, message), ("Ready", False, reason, message)]))
    raise kopf.TemporaryError(message, delay=delay)


async def _refuse_foreign(body: dict, field: str, *, app: str, region: str, size_gb: int, what: str) -> None:
    """Hold, naming `field`, when the source is another app's, another region's, or larger than this Volume."""
    spec = body["spec"]
    refused = snapshots.check_source(app=spec["app"], region=spec["region"], size_gb=spec["sizeGb"], source_app=app,
                                     source_region=region, source_size_gb=size_gb, what=what)
    if refused:
        await _hold(body, refused.reason, f"{field}: {refused.message}", 30)


async def _copies(namespace: str) -> list[snapshots.StoredCopy]:
    found = [snapshots.StoredCopy.of(s) for s in await kube().list(custom_path(namespace, "snapshots"))]
    return [c for c in found if c is not None]


async def _fork_copy(body: dict) -> snapshots.StoredCopy:
    """The copy a fork restores: fresh from the running source, else its newest stored one."""
    meta, spec = body["metadata"], body["spec"]
    ns, source = meta["namespace"], spec["forkFrom"]
    src = await kube().get(custom_path(ns, "volumes", source), missing_ok=True)
    if src is None:
        await _hold(body, "SourceNotFound", f"spec.forkFrom: there is no Volume {source} in namespace {ns}", 10)
    sspec, sstatus = src["spec"], src.get("status") or {}
    await _refuse_foreign(body, "spec.forkFrom", app=sspec["app"], region=sspec["region"],
                          size_gb=sspec.get("sizeGb", 1), what=f"volume {source}")
    fresh_name = f"{meta['name'][:40]}-fork-{meta['uid'][:8]}"
    fresh = await kube().get(custom_path(ns, "snapshots", fresh_name), missing_ok=True)
    host_up = bool(sstatus.get("host")) and is_ready(await kube().get(core_path(None, "nodes", sstatus["host"]), missing_ok=True))
    if fresh is not None and (fresh.get("status") or {}).get("phase") != "Failed":
        copy = snapshots.StoredCopy.of(fresh)
        if copy is None:
            await _hold(body, "Snapshotting", f"taking snapshot {fresh_name} of volume {source} on host {sstatus.get('host')}", 1)
        return copy
    plan = snapshots.plan_fork(source=source, source_uid=src["metadata"]["uid"], source_host_ready=host_up and fresh is None,
                               copies=await _copies(ns))
    if plan.kind == "refused":
        await _hold(body, plan.refusal.reason, plan.refusal.message, 15)
    if plan.kind == "stored":
        return plan.copy
    await kube().create(custom_path(ns, "snapshots"), {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Snapshot",
        "metadata": {"name": fresh_name, "namespace": ns, "labels": {snapshots.FORK_OF: meta["name"], "kubefly.dev/volume": source}},
        "spec": {"volume": source}}, exists_ok=True)
    await _hold(body, "Snapshotting", f"taking snapshot {fresh_name} of volume {source} on host {sstatus['host']}", 1)


async def _snapshot_copy(body: dict) -> snapshots.StoredCopy:
    meta, spec = body["metadata"], body["spec"]
    ns, name = meta["namespace"], spec["restoreFrom"]
    snap = await kube().get(custom_path(ns, "snapshots", name), missing_ok=True)
    if snap is None:
        await _hold(body, "SnapshotNotFound", f"spec.restoreFrom: there is no Snapshot {name} in namespace {ns}", 10)
    copy = snapshots.StoredCopy.of(snap)
    if copy is None:
        st = snap.get("status") or {}
        if st.get("phase") == "Failed":
            await _hold(body, "SnapshotFailed", f"spec.restoreFrom: snapshot {name} failed ({st.get('message')}): "
                                                f"nothing to restore; create the Volume from another snapshot", 30)
        await _hold(body, "SnapshotPending", f"spec.restoreFrom: snapshot {name} is still being taken", 2)
    await _refuse_foreign(body, "spec.restoreFrom", app=copy.app, region=copy.region, size_gb=copy.size_gb,
                          what=f"snapshot {name}")
    return copy


async def ensure_data(body: dict, host: str, memo: kopf.Memo, logger) -> None:
    """Return once the Volume's directory holds its source's data (or it has no source); else hold with a reason."""
    meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
    restored = get_condition(status.get("conditions"), CONDITION)
    if not source_of(spec) or (restored and restored.get("status") == "True"):
        return
    store, image = memo.object_store, os.environ.get(IMAGE_ENV, "")
    if store is None or not image:
        await _hold(body, "ObjectStoreNotConfigured", snapshots.NOT_CONFIGURED if store is None
                    else f"the operator has no image to run restic with ({IMAGE_ENV})", 60)
    copy = await (_snapshot_copy(body) if spec.get("restoreFrom") else _fork_copy(body))
    home, ns = home_namespace(memo), meta["namespace"]
    path = objects.host_path(ns, meta["name"], meta["uid"])
    pod_path = core_path(home, "pods", snapshots.restore_pod_name(meta["uid"]))
    wanted = snapshots.build_restore_pod(home=home, store=store, image=image, repo=copy.repository,
                                         snapshot_id=copy.snapshot_id, namespace=ns, volume=meta["name"],
                                         volume_uid=meta["uid"], host=host, path=path)
    pod = await kube().create_or_get(core_path(home, "pods"), wanted)
    out = snapshots.outcome(pod or {})
    age = int((datetime.now(timezone.utc) - copy.taken_at).total_seconds())
    what = f"snapshot {copy.name} of volume {copy.volume} (taken {rfc3339(copy.taken_at)} on host {copy.host}, {age} s old)"
    if out.state == "running":
        await _hold(body, "Restoring", f"restoring {what} on host {host}: {out.message}", 1)
    await kube().delete(pod_path, missing_ok=True)
    if out.state == "failed":
        await _hold(body, "RestoreFailed", f"restoring {what} on host {host} failed: {out.message}; retrying", 10)
    r = out.result
    message = f"restored {r.get('bytes', 0)} bytes of {what} on host {host} in {r.get('seconds', 0)} s"
    record = {"snapshot": copy.name, "volume": copy.volume, "takenAt": rfc3339(copy.taken_at), "dataAgeSeconds": max(age, 0),
              "bytes": r.get("bytes"), "durationSeconds": r.get("seconds")}
    await update_status("volumes", ns, meta["name"], lambda b: condition_patch(
        b, [(CONDITION, True, "Restored", message)], {"restoredFrom": record}))
    VOLUME_COPY_SECONDS.labels("restore").observe(r.get("seconds") or 0)
    VOLUME_COPY_BYTES.labels("restore").inc(r.get("bytes") or 0)
    kopf.event(body, type="Normal", reason="Restored", message=message)
    logger.info(message)
