"""Volume migration handler: move a Volume and its Machine to another host (kubefly.volumes.migration).

A daemon per Volume that carries the annotation kubefly.dev/migrate-from
naming its host (set by the Machine controller for a Machine asked to move,
or by a user), or has a migration under way. Thin: each step reads the
Volume's status.migration, does the work of its phase (a Snapshot, a restore
pod, waiting for the Machine's pod to go, the claim re-made on the target, a
wipe pod), writes the next phase and goes on; anything still running raises
a short TemporaryError and the daemon steps again after its delay.
The Machine controller reads the phase from the Volume: it stops the machine
for Stopping..Switching and starts a new instance wherever the Volume's host
now is. A refused or failed migration keeps the annotation and is tried again;
removing the annotation cancels one that has not stopped the machine yet.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timezone

import kopf

from kubefly import GROUP, VERSION
from kubefly.conditions import rfc3339
from kubefly.controllers import wipe_pod
from kubefly.controllers.common import condition_patch, home_namespace, update_status
from kubefly.controllers.kubeapi import core_path, custom_path, kube
from kubefly.controllers.main import VOLUME_MIGRATIONS, VOLUME_MIGRATION_DOWNTIME
from kubefly.labels import MIGRATE_FROM
from kubefly.machines.volume_prep import IMAGE_ENV
from kubefly.placement import machines as machine_placement
from kubefly.placement import volumes as volume_placement
from kubefly.volumes import objects, snapshots, wipe
from kubefly.volumes.migration import CONDITION, Migration, choose_target, downtime_s, stop_overdue

PLURAL = "volumes"
POLL_S = 0.25
GONE_WAIT_S = 30.0


class _Abort(Exception):
    """A copy failed before the switch: the migration goes to Aborting with this reason."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


async def _get(namespace: str, name: str) -> dict | None:
    return await kube().get(custom_path(namespace, PLURAL, name), missing_ok=True)


async def _record(body: dict, m: Migration | None, condition: tuple[str, bool, str, str] | None = None,
                  extra: dict | None = None) -> None:
    meta = body["metadata"]
    fields = {"migration": m.status() if m else None, **(extra or {})}
    await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: condition_patch(
        b, [condition] if condition else [], fields) or None)


async def _unannotate(body: dict) -> None:
    meta = body["metadata"]
    await kube().patch(custom_path(meta["namespace"], PLURAL, meta["name"]),
                       {"metadata": {"annotations": {MIGRATE_FROM: None}}}, missing_ok=True)


async def _target(body: dict, source: str):
    meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
    k = kube()
    nodes, volumes, machines = await asyncio.gather(
        k.list(core_path(None, "nodes")), k.list(custom_path(None, PLURAL)), k.list(custom_path(None, "machines")))
    attached = status.get("attachedMachine")
    mine = next((m for m in machines if m["metadata"]["namespace"] == meta["namespace"]
                 and m["metadata"]["name"] == attached), None)
    request = None
    if mine is not None:
        cpu, mem = machine_placement.guest_requests((mine.get("spec") or {}).get("guest"))
        request = machine_placement.Request((meta["namespace"], attached), f"{meta['namespace']}/{spec['app']}",
                                            spec["region"], cpu, mem)
    return choose_target(
        volume=volume_placement.VolumeRequest(meta["namespace"], meta["name"], spec["app"], spec["region"], spec["sizeGb"]),
        source=source, volume_hosts=[volume_placement.host_of_node(n) for n in nodes],
        placed_volumes=[p for p in map(volume_placement.PlacedVolume.of_volume, volumes) if p is not None],
        machine=request, machine_hosts=[machine_placement.Host.of_node(n) for n in nodes],
        placed_machines=[p for p in map(machine_placement.Placed.of_machine, machines) if p is not None])


async def _copy(body: dict, m: Migration, n: int) -> dict:
    """Snapshot `n` of this migration, taken by the Snapshot controller: its status (phase not Failed)."""
    meta = body["metadata"]
    ns, name = meta["namespace"], m.snapshot_name(meta["name"], n)
    snap = await kube().create_or_get(custom_path(ns, "snapshots"), {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Snapshot",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubefly.dev/volume": meta["name"], "kubefly.dev/migration": "true"}},
        "spec": {"volume": meta["name"]}})
    st = (snap or {}).get("status") or {}
    if st.get("phase") == "Failed":
        await kube().delete(custom_path(ns, "snapshots", name), missing_ok=True)
        raise _Abort(f"snapshot {name} failed: {st.get('message')}")
    return st


async def _restore(body: dict, m: Migration, memo: kopf.Memo, n: int, snapshot_id: str | None,
                   since: str | None) -> dict:
    """Restore pass `n` on the target: the whole copy `snapshot_id`, or (pass 2) the delta since the first,
    of the copy this pass's Snapshot is making (the pod waits for it); the pod's result."""
    meta = body["metadata"]
    home, store, image = home_namespace(memo), memo.object_store, os.environ.get(IMAGE_ENV, "")
    wanted = snapshots.build_restore_pod(
        home=home, store=store, image=image, repo=snapshots.repository(meta["namespace"], meta["name"], meta["uid"]),
        snapshot_id=snapshot_id, snapshot=m.snapshot_name(meta["name"], n), namespace=meta["namespace"],
        volume=meta["name"], volume_uid=meta["uid"], host=m.target,
        path=objects.host_path(meta["namespace"], meta["name"], meta["uid"]), name=m.restore_pod_name(meta["uid"], n),
        since=since)
    pod_path = core_path(home, "pods", wanted["metadata"]["name"])
    out = snapshots.outcome(await kube().create_or_get(core_path(home, "pods"), wanted) or {})
    if out.state == "running":
        raise kopf.TemporaryError(f"restoring on host {m.target}: {out.message}", delay=POLL_S)
    await kube().delete(pod_path, missing_ok=True)
    if out.state == "failed":
        raise _Abort(f"restoring on host {m.target} failed: {out.message}")
    return out.result


async def _machine_stopped(body: dict) -> bool:
    machine = (body.get("status") or {}).get("attachedMachine")
    if not machine:
        return True
    return await kube().get(core_path(body["metadata"]["namespace"], "pods", machine), missing_ok=True) is None


async def _gone(path: str) -> None:
    deadline = time.monotonic() + GONE_WAIT_S
    while await kube().get(path, missing_ok=True) is not None:
        if time.monotonic() > deadline:
            raise kopf.TemporaryError(f"{path} is still being deleted", delay=2)
        await asyncio.sleep(0.2)


async def _switch(body: dict, m: Migration) -> dict:
    """Claim and PV made again, pinned to the target (a PV's node affinity cannot change); the new PV."""
    meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
    ns, k = meta["namespace"], kube()
    claim = core_path(ns, "persistentvolumeclaims", objects.claim_name(meta["name"]))
    new_pv = objects.pv_name(ns, meta["name"], meta["uid"])
    # The claim first: its protection lets it go once no pod mounts it (the machine is stopped).
    await k.delete(claim, missing_ok=True)
    await _gone(claim)
    for pv in {status.get("persistentVolume") or new_pv, new_pv}:
        await k.delete(core_path(None, "persistentvolumes", pv), missing_ok=True)
        await _gone(core_path(None, "persistentvolumes", pv))
    pv = await k.create_or_get(core_path(None, "persistentvolumes"), objects.build_pv(
        namespace=ns, volume=meta["name"], uid=meta["uid"], app=spec["app"], region=spec["region"], host=m.target,
        size_gb=spec["sizeGb"]))
    await k.create_or_get(core_path(ns, "persistentvolumeclaims"),
                          objects.build_pvc(body=body, pv=new_pv, host=m.target, size_gb=spec["sizeGb"]))
    return pv


async def _wipe(body: dict, memo: kopf.Memo, host: str, path: str, logger) -> None:
    """The migration's copy on `host` removed (the source's after the switch, the target's on abort)."""
    meta = body["metadata"]
    if wipe.relative_dir(path) is None:
        kopf.warn(body, reason="DataLeftOnHost", message=f"{path} on host {host} is outside {objects.HOST_ROOT}: not removed")
        return
    v, pod_path, _node = await wipe_pod.run(home=home_namespace(memo), meta=meta, host=host, path=path,
                                            image=os.environ.get(IMAGE_ENV, ""), name=f"volume-migrate-wipe-{meta['uid']}")
    if v.outcome == "waiting":
        raise kopf.TemporaryError(v.message, delay=1)
    await kube().delete(pod_path, missing_ok=True)
    if v.outcome == "failed":
        raise kopf.TemporaryError(v.message, delay=10)
    if v.outcome == "left":
        kopf.warn(body, reason=v.reason, message=v.message)
    logger.info(v.message)


def _asked_or_under_way(body: kopf.Body, **_) -> bool:
    return bool((body["metadata"].get("annotations") or {}).get(MIGRATE_FROM)) or bool((body.get("status") or {}).get("migration"))


# A daemon, not an update handler: Kopf leaves annotations of its own prefix (kubefly.dev/) out of
# the changes it reacts to, and a migration under way must go on even if its annotation goes.
@kopf.daemon(GROUP, VERSION, PLURAL, id="volume-migrate", when=_asked_or_under_way, cancellation_timeout=5.0)
async def run_migration(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, logger, **_) -> None:
    while not stopped:
        try:
            await _step(body, memo, logger)
            delay = 2.0  # done, or nothing asked: Kopf stops this daemon once the Volume no longer matches
        except kopf.TemporaryError as exc:
            delay = exc.delay or POLL_S
        except Exception:
            logger.exception("migration step failed; trying again")
            delay = 10.0
        await stopped.wait(delay)


async def _step(body: kopf.Body, memo: kopf.Memo, logger) -> None:
    meta = body["metadata"]
    fresh = await _get(meta["namespace"], meta["name"])
    if fresh is None or fresh["metadata"].get("deletionTimestamp"):
        return
    leave = (fresh["metadata"].get("annotations") or {}).get(MIGRATE_FROM)
    status = fresh.get("status") or {}
    m = Migration.of(status)
    if m is None:
        if not leave:
            return
        if status.get("host") != leave:
            await _record(fresh, None, (CONDITION, False, "NotOnHost",
                                        f"annotation {MIGRATE_FROM} names host {leave}, but the volume is on host "
                                        f"{status.get('host')}: nothing to move"))
            await _unannotate(fresh)
            return
        if memo.object_store is None or not os.environ.get(IMAGE_ENV):
            message = (snapshots.NOT_CONFIGURED if memo.object_store is None
                       else f"the operator has no image to run restic with ({IMAGE_ENV})")
            await _record(fresh, None, (CONDITION, False, "ObjectStoreNotConfigured", f"cannot migrate: {message}"))
            raise kopf.TemporaryError(message, delay=60)
        target = await _target(fresh, leave)
        if target.host is None:
            await _record(fresh, None, (CONDITION, False, target.reason, f"cannot migrate off host {leave}: {target.message}"))
            raise kopf.TemporaryError(target.message, delay=10)
        m = Migration(source=leave, target=target.host, phase="Copying", started_at=_now(),
                      source_path=status.get("path") or objects.host_path(meta["namespace"], meta["name"], meta["uid"]))
        await _record(fresh, m, (CONDITION, False, "Copying", m.describe()))
        kopf.event(fresh, type="Normal", reason="Migrating", message=f"moving from host {leave} to host {m.target}")
        logger.info(f"migrating from host {leave} to host {m.target}")
    elif not leave and m.phase == "Copying":
        # Cancelled before the machine stopped: the source is untouched; the partial copy goes.
        m = m.at("Aborting", reason=f"annotation {MIGRATE_FROM} removed")
        await _record(fresh, m, (CONDITION, False, "Aborting", m.describe()))
    try:
        await _advance(fresh, m, memo, logger)
    except _Abort as exc:
        m = Migration.of((await _get(meta["namespace"], meta["name"]) or fresh).get("status") or {}) or m
        m = m.at("Aborting", reason=str(exc)[:500])
        await _record(fresh, m, (CONDITION, False, "Aborting", m.describe()))
        kopf.warn(fresh, reason="MigrationFailed", message=f"migration to host {m.target} aborted: {exc}")
        await _advance(fresh, m, memo, logger)


async def _advance(body: dict, m: Migration, memo: kopf.Memo, logger) -> None:
    """Do each phase's step until one has to wait (TemporaryError) or the migration is over."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    target_path = objects.host_path(ns, name, meta["uid"])
    source_path = m.source_path or target_path
    while True:
        if m.phase == "Copying":
            first = await _copy(body, m, 1)
            if first.get("phase") != "Succeeded" or not first.get("snapshotId"):
                # Its live pass and frozen pass carry one tag: only the finished copy's id is the one.
                raise kopf.TemporaryError("taking the first copy", delay=POLL_S)
            await _restore(body, m, memo, 1, first["snapshotId"], since=None)
            m = m.at("Stopping", first_copy=first["snapshotId"], stopped_at=_now())
        elif m.phase == "Stopping":
            if not await _machine_stopped(body):
                if stop_overdue(m, _now()):
                    raise _Abort("the machine did not stop")
                await _record(body, m, (CONDITION, False, "Stopping", m.describe()))
                raise kopf.TemporaryError("waiting for the machine to stop", delay=0.2)
            m = m.at("Syncing")
        elif m.phase == "Syncing":
            # Copy and restore start together: the restore pod waits for the copy (the machine is stopped,
            # so it is taken in one pass), and neither pod's start is waited for twice.
            await _copy(body, m, 2)
            synced = await _restore(body, m, memo, 2, None, since=m.first_copy)
            m = m.at("Switching", final_copy=synced.get("snapshotId"))
        elif m.phase == "Switching":
            pv = await _switch(body, m)
            switched = _now()
            down = downtime_s(m, switched)
            m = m.at("Cleaning")
            # The host moves with the phase in one write: the Machine starts on the target from here on.
            await _record(body, m, (CONDITION, False, "Cleaning", m.describe()), {
                "host": m.target, "persistentVolume": pv["metadata"]["name"], "path": objects.path_of_pv(pv),
                "lastMigration": {"source": m.source, "target": m.target, "startedAt": rfc3339(m.started_at),
                                  "finishedAt": rfc3339(switched), "downtimeSeconds": down}})
            if down is not None:
                VOLUME_MIGRATION_DOWNTIME.observe(down)
            continue
        elif m.phase == "Cleaning":
            await _wipe(body, memo, m.source, source_path, logger)
            await kube().delete(custom_path(ns, "snapshots", m.snapshot_name(name, 1)), missing_ok=True)
            record = ((await _get(ns, name) or body).get("status") or {}).get("lastMigration") or {}
            message = (f"moved from host {m.source} to host {m.target}"
                       + (f"; the machine was down {record['downtimeSeconds']} s for the last copy"
                          if record.get("downtimeSeconds") is not None else ""))
            await _record(body, None, (CONDITION, True, "Migrated", message))
            await _unannotate(body)
            kopf.event(body, type="Normal", reason="Migrated", message=message)
            VOLUME_MIGRATIONS.labels("migrated").inc()
            logger.info(message)
            return
        elif m.phase == "Aborting":
            home = home_namespace(memo)
            for n in (1, 2):  # a restore still waiting for its copy would write after the wipe
                await kube().delete(core_path(home, "pods", m.restore_pod_name(meta["uid"], n)), missing_ok=True)
            await _wipe(body, memo, m.target, target_path, logger)
            await _record(body, None, (CONDITION, False, "MigrationFailed",
                                       f"the move to host {m.target} was aborted ({m.reason}); the volume stays on "
                                       f"host {m.source}" + ("" if not _still_asked(body) else "; trying again")))
            VOLUME_MIGRATIONS.labels("aborted").inc()
            if _still_asked(body):
                raise kopf.TemporaryError(f"migration aborted: {m.reason}; trying again", delay=30)
            return
        await _record(body, m, (CONDITION, False, m.phase, m.describe()))


def _still_asked(body: dict) -> bool:
    return bool((body["metadata"].get("annotations") or {}).get(MIGRATE_FROM))

