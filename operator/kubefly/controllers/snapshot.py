"""Snapshot handlers: take the copy on the Volume's host, expire it, forget it; schedule Volumes' snapshots.

Thin: read the Snapshot, its Volume, the host and the Machine's pod; build
kubefly.volumes.snapshots' pod; read its outcome back into status. The pod's
termination message carries restic's figures (no API access from the pod).
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime, timezone

import kopf
import structlog

from kubefly import GROUP, VERSION
from kubefly.api.snapshot import Snapshot
from kubefly.controllers import acceptance
from kubefly.conditions import is_ready, parse_rfc3339, rfc3339
from kubefly.controllers.common import condition_patch, home_namespace, update_status
from kubefly.controllers.kubeapi import core_path, custom_path, kube
from kubefly.controllers.main import RECONCILES, VOLUME_COPY_BYTES, VOLUME_COPY_SECONDS
from kubefly.labels import SCHEDULED
from kubefly.machines.volume_prep import IMAGE_ENV
from kubefly.volumes import snapshots
from kubefly.volumes.snapshots import ObjectStore

PLURAL = "snapshots"
POLL_S = 0.5
CLOCK_S = 60.0
log = structlog.get_logger("kubefly.controllers.snapshot")


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def _finish(body: dict, phase: str, reason: str, message: str, extra: dict | None = None,
                  retention_days: int = 5) -> None:
    meta = body["metadata"]
    now = _now()
    fields = {"phase": phase, "message": message, "expiresAt": rfc3339(snapshots.expires_at(now, retention_days)),
              "observedGeneration": meta.get("generation"), **(extra or {})}
    await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: condition_patch(
        b, [("Ready", phase == "Succeeded", reason, message)], fields))
    kopf.event(body, type="Normal" if phase == "Succeeded" else "Warning", reason=reason, message=message)
    RECONCILES.labels("Snapshot", phase.lower()).inc()


async def _machine_pod_uid(namespace: str, volume: dict, host: str) -> str | None:
    """The uid of the running pod of the Machine that mounts the volume, on its host (the one to freeze)."""
    machine = (volume.get("status") or {}).get("attachedMachine")
    if not machine:
        return None
    pod = await kube().get(core_path(namespace, "pods", machine), missing_ok=True)
    if not pod or pod["spec"].get("nodeName") != host or (pod.get("status") or {}).get("phase") != "Running":
        return None
    return pod["metadata"]["uid"]


@kopf.on.resume(GROUP, VERSION, PLURAL, id="snapshot")
@kopf.on.create(GROUP, VERSION, PLURAL, id="snapshot")
async def take(body: kopf.Body, memo: kopf.Memo, logger, **_) -> None:
    body = dict(body)
    meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    ns = meta["namespace"]
    if status.get("phase") in ("Succeeded", "Failed"):
        return
    result = acceptance.check(Snapshot, body)
    if not result.ok:
        await _finish(body, "Failed", "InvalidSpec", result.message)
        return
    store: ObjectStore | None = memo.object_store
    image = os.environ.get(IMAGE_ENV, "")
    if store is None or not image:
        await _finish(body, "Failed", "ObjectStoreNotConfigured",
                      snapshots.NOT_CONFIGURED if store is None else f"the operator has no image to run restic with ({IMAGE_ENV})")
        return
    volume = await kube().get(custom_path(ns, "volumes", spec["volume"]), missing_ok=True)
    if volume is None:
        await _finish(body, "Failed", "VolumeNotFound", f"spec.volume: there is no Volume {spec['volume']} in namespace {ns}")
        return
    vmeta, vspec, vstatus = volume["metadata"], volume.get("spec") or {}, volume.get("status") or {}
    retention = spec.get("retentionDays") or vspec.get("snapshotRetention") or 5
    host, path = vstatus.get("host"), vstatus.get("path")
    if not host or not path:
        await _finish(body, "Failed", "VolumeNotPlaced", f"volume {spec['volume']} has no host yet: there is no data to copy",
                      retention_days=retention)
        return
    home = home_namespace(memo)
    pod_name = snapshots.snapshot_pod_name(meta["uid"])
    pod = await kube().get(core_path(home, "pods", pod_name), missing_ok=True)
    if pod is None:
        node = await kube().get(core_path(None, "nodes", host), missing_ok=True)
        if not is_ready(node):
            await _finish(body, "Failed", "HostUnavailable",
                          f"host {host} of volume {spec['volume']} is {'NotReady' if node else 'gone'}: a snapshot is copied "
                          f"from the volume's host; fork from a stored snapshot instead (Volume spec.forkFrom)",
                          {"host": host}, retention)
            return
        wanted = snapshots.build_snapshot_pod(
            home=home, store=store, image=image, snapshot=meta["name"], snapshot_uid=meta["uid"], namespace=ns,
            volume=spec["volume"], volume_uid=vmeta["uid"], host=host, path=path,
            machine_pod_uid=await _machine_pod_uid(ns, volume, host))
        pod = await kube().create_or_get(core_path(home, "pods"), wanted)
        if pod is None:
            raise kopf.TemporaryError("snapshot pod conflicts but cannot be read; retrying", delay=2)
        record = {"phase": "Running", "message": f"copying {path} on host {host}", "host": host,
                  "volumeUid": vmeta["uid"], "app": vspec.get("app"), "region": vspec.get("region"),
                  "sizeGb": vspec.get("sizeGb", 1), "repository": snapshots.repository(ns, spec["volume"], vmeta["uid"]),
                  "startedAt": rfc3339(_now()), "observedGeneration": meta.get("generation")}
        await update_status(PLURAL, ns, meta["name"], lambda b: condition_patch(
            b, [("Ready", False, "Copying", record["message"])], record))
    out = snapshots.outcome(pod)
    if out.state == "running":
        if not is_ready(await kube().get(core_path(None, "nodes", host), missing_ok=True)):
            # A host lost mid-copy never finishes it: say so now (a fork waiting on it takes a stored copy).
            await kube().delete(core_path(home, "pods", pod_name), missing_ok=True)
            await _finish(body, "Failed", "HostUnavailable", f"host {host} was lost while copying volume {spec['volume']}",
                          retention_days=retention)
            return
        raise kopf.TemporaryError(f"snapshot pod {home}/{pod_name}: {out.message}", delay=POLL_S)
    if out.state == "failed":
        await _finish(body, "Failed", "SnapshotFailed", f"restic on host {host} failed: {out.message}",
                      retention_days=retention)
    else:
        r = out.result
        message = (f"{r.get('bytes', 0)} bytes from host {host} in {r.get('seconds', 0)} s "
                   f"({r.get('addedBytes', 0)} new to the store), {r.get('consistency', 'live')}"
                   + (f": {r['note']}" if r.get("note") else ""))
        await _finish(body, "Succeeded", "SnapshotTaken", message, {
            "snapshotId": r.get("snapshotId"), "bytes": r.get("bytes"), "addedBytes": r.get("addedBytes"),
            "files": r.get("files"), "durationSeconds": r.get("seconds"), "frozenSeconds": r.get("frozenSeconds"),
            "consistency": r.get("consistency"), "takenAt": rfc3339(_now())}, retention)
        VOLUME_COPY_SECONDS.labels("snapshot").observe(r.get("seconds") or 0)
        VOLUME_COPY_BYTES.labels("snapshot").inc(r.get("addedBytes") or 0)
        logger.info(f"snapshot taken: {message}")
    await kube().delete(core_path(home, "pods", pod_name), missing_ok=True)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="snapshot")
async def forget(body: kopf.Body, memo: kopf.Memo, logger, **_) -> None:
    """The copy leaves the store with its object: restic forgets it and prunes what nothing else uses."""
    meta, status = body["metadata"], body.get("status") or {}
    home, store, image = home_namespace(memo), memo.object_store, os.environ.get(IMAGE_ENV, "")
    await kube().delete(core_path(home, "pods", snapshots.snapshot_pod_name(meta["uid"])), missing_ok=True)
    if not status.get("snapshotId") or not status.get("repository"):
        return
    if store is None or not image:
        kopf.warn(body, reason="DataLeftInStore", message=f"copy {status['snapshotId']} stays in {status['repository']}: "
                                                          f"the operator has no object store or image to remove it with")
        return
    wanted = snapshots.build_forget_pod(home=home, store=store, image=image, repo=status["repository"],
                                        snapshot_id=status["snapshotId"], snapshot_uid=meta["uid"],
                                        namespace=meta["namespace"], snapshot=meta["name"])
    path = core_path(home, "pods", wanted["metadata"]["name"])
    pod = await kube().create_or_get(core_path(home, "pods"), wanted)
    out = snapshots.outcome(pod or {})
    if out.state == "running":
        raise kopf.TemporaryError(f"forgetting copy {status['snapshotId']}: {out.message}", delay=POLL_S)
    await kube().delete(path, missing_ok=True)
    if out.state == "failed":
        # Usually another prune holding the repository's lock: try again shortly.
        raise kopf.TemporaryError(f"forgetting copy {status['snapshotId']} failed: {out.message}; retrying", delay=10)
    logger.info(f"copy {status['snapshotId']} forgotten in {status['repository']}")


# ---- the clock: schedules and retention ----------------------------------------
# One loop over all Volumes and Snapshots, not a Kopf timer per object: Kopf holds
# an object's deletion while a timer of it is alive (up to its cancellation polling,
# a minute), and a Volume or Snapshot being deleted must not wait for a clock.


async def _schedule(volume: dict, now) -> None:
    """Every snapshotIntervalHours a Volume gets a Snapshot, named for its slot so a slot never gets two."""
    meta, spec, status = volume["metadata"], volume["spec"], volume.get("status") or {}
    interval = spec.get("snapshotIntervalHours", 24)
    last, placed = parse_rfc3339(status.get("lastSnapshotAt")), parse_rfc3339(meta["creationTimestamp"])
    slot = snapshots.due_slot(interval_hours=interval, last=last, placed=placed, now=now)
    if slot is None:
        following = rfc3339(snapshots.next_slot(interval_hours=interval, since=last or placed))
        if status.get("nextSnapshotAt") != following:
            await update_status("volumes", meta["namespace"], meta["name"], lambda b: {"nextSnapshotAt": following})
        return
    name = snapshots.scheduled_name(meta["name"], slot)
    await kube().create(custom_path(meta["namespace"], PLURAL), {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Snapshot",
        "metadata": {"name": name, "namespace": meta["namespace"],
                     "labels": {SCHEDULED: "true", "kubefly.dev/volume": meta["name"]}},
        "spec": {"volume": meta["name"]}}, exists_ok=True)
    taken = snapshots.slot_taken(slot=slot, now=now, interval_hours=interval)
    await update_status("volumes", meta["namespace"], meta["name"], lambda b: {
        "lastSnapshot": name, "lastSnapshotAt": rfc3339(taken),
        "nextSnapshotAt": rfc3339(snapshots.next_slot(interval_hours=interval, since=taken))})
    log.info("scheduled snapshot created", namespace=meta["namespace"], name=meta["name"], snapshot=name, every_hours=interval)


async def _tick() -> None:
    now = _now()
    for v in await kube().list(custom_path(None, "volumes")):
        spec, status = v.get("spec") or {}, v.get("status") or {}
        if spec.get("scheduledSnapshots", True) and status.get("claim") and not v["metadata"].get("deletionTimestamp"):
            await _schedule(v, now)
    for s in await kube().list(custom_path(None, PLURAL)):
        expires = parse_rfc3339((s.get("status") or {}).get("expiresAt"))
        if expires and now >= expires and not s["metadata"].get("deletionTimestamp"):
            # Its finalizer removes the copy from the store.
            await kube().delete(custom_path(s["metadata"]["namespace"], PLURAL, s["metadata"]["name"]), missing_ok=True)
            log.info("snapshot expired: deleted", namespace=s["metadata"]["namespace"], name=s["metadata"]["name"],
                     expired_at=s["status"]["expiresAt"])


async def _clock(stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await _tick()
        except Exception as exc:  # the next tick tries again; one bad answer must not end schedules
            log.error("snapshot clock tick failed", error=str(exc))
        try:
            await asyncio.wait_for(stop.wait(), CLOCK_S)
        except TimeoutError:
            pass


@kopf.on.startup()
async def start_clock(memo: kopf.Memo, **_) -> None:
    memo.snapshot_clock_stop = asyncio.Event()
    # Without a store nothing is scheduled: the Volumes' SnapshotsScheduled condition says so.
    memo.snapshot_clock = asyncio.create_task(_clock(memo.snapshot_clock_stop)) if memo.object_store else None


@kopf.on.cleanup()
async def stop_clock(memo: kopf.Memo, **_) -> None:
    memo.snapshot_clock_stop.set()
    if memo.snapshot_clock is not None:
        await memo.snapshot_clock
