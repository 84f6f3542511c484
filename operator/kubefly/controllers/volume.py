"""Volume handlers: place on a host, create the pinned PV and its claim, guard deletion, wipe the data.

Thin: read the Volume and a snapshot (nodes, placed volumes), ask
kubefly.placement.volumes for a host, apply kubefly.volumes.objects' PV/PVC
with create-if-absent under deterministic names, then write status. Deletion
waits for the Machine to detach, deletes claim and PV and wipes the host
directory with kubefly.volumes.wipe's pod before the finalizer goes. Status is
written with a resourceVersion precondition (and retried on conflict) because
the Machine controller writes `attachedMachine` on the same objects.
"""

from __future__ import annotations

import asyncio
import os
import time

import kopf

from kubefly import GROUP, VERSION
from kubefly.api.volume import SIZE_NOT_ENFORCED, Volume
from kubefly.conditions import get_condition
from kubefly.controllers import acceptance, restore, wipe_pod
from kubefly.controllers.common import condition_patch, home_namespace, update_status
from kubefly.controllers.kubeapi import core_path, custom_path, kube
from kubefly.controllers.main import RECONCILE_SECONDS, RECONCILES
from kubefly.labels import VOLUME as VOLUME_LABEL
from kubefly.machines.volume_prep import IMAGE_ENV
from kubefly.placement import volumes as placement
from kubefly.volumes import objects, redundancy, snapshots, wipe

PLURAL = "volumes"
# Placements are decided one at a time so two Volumes never both take a host's last room.
_PLACING = asyncio.Lock()


async def _get(namespace: str, name: str) -> dict | None:
    return await kube().get(custom_path(namespace, PLURAL, name), missing_ok=True)


# ---- snapshot ----------------------------------------------------------------


async def _snapshot() -> tuple[list[placement.Host], list[placement.PlacedVolume]]:
    k = kube()
    nodes, volumes = await asyncio.gather(k.list(core_path(None, "nodes")), k.list(custom_path(None, PLURAL)))
    hosts = [placement.host_of_node(n) for n in nodes]
    return hosts, [p for p in map(placement.PlacedVolume.of_volume, volumes) if p is not None]


async def _read_pv(name: str) -> dict | None:
    return await kube().get(core_path(None, "persistentvolumes", name), missing_ok=True)


async def _read_pvc(namespace: str, name: str) -> dict | None:
    return await kube().get(core_path(namespace, "persistentvolumeclaims", name), missing_ok=True)


async def _machine_exists(namespace: str, name: str) -> bool:
    return await kube().get(custom_path(namespace, "machines", name), missing_ok=True) is not None


# ---- reconcile ---------------------------------------------------------------


async def _place(body: dict, logger) -> str | None:
    """The volume's host: from status, from its PV (status lost), or placed now."""
    meta, spec = body["metadata"], body["spec"]
    pv = await _read_pv(objects.pv_name(meta["namespace"], meta["name"], meta["uid"]))
    if pv is not None and objects.host_of_pv(pv):
        return objects.host_of_pv(pv)
    # Placed before, its PV not made yet (a restore fills the directory first): the recorded host stands.
    recorded = ((await _get(meta["namespace"], meta["name"]) or body).get("status") or {}).get("host")
    if recorded:
        return recorded
    avoid = await restore.avoid_host(body)
    async with _PLACING:
        hosts, placed = await _snapshot()
        request = placement.VolumeRequest(meta["namespace"], meta["name"], spec["app"], spec["region"], spec["sizeGb"],
                                          avoid_host=avoid)
        decision = placement.place(request, hosts, placed)
        if isinstance(decision, placement.Refused):
            await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: condition_patch(
                b, [("Placed", False, decision.reason, decision.message), ("Ready", False, decision.reason, decision.message)]
            ))
            return None
        # The host is recorded before anything is created on it, so a restart
        # in between finds the decision and never places the volume twice.
        message = f"pinned to host {decision.host} in region {spec['region']}"
        await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: condition_patch(
            b, [("Placed", True, "Placed", message)], {"host": decision.host}
        ))
    logger.info(f"volume placed on host {decision.host}")
    return decision.host


async def _ensure_objects(body: dict, host: str) -> tuple[dict, dict]:
    meta, spec = body["metadata"], body["spec"]
    ns = meta["namespace"]
    name = objects.pv_name(ns, meta["name"], meta["uid"])
    claim = objects.claim_name(meta["name"])
    pv = await _read_pv(name)
    if pv is None:
        wanted = objects.build_pv(namespace=ns, volume=meta["name"], uid=meta["uid"], app=spec["app"],
                                  region=spec["region"], host=host, size_gb=spec["sizeGb"])
        pv = await _create(core_path(None, "persistentvolumes"), wanted)
    pvc = await _read_pvc(ns, claim)
    if pvc is None:
        wanted = objects.build_pvc(body=body, pv=name, host=host, size_gb=spec["sizeGb"])
        pvc = await _create(core_path(ns, "persistentvolumeclaims"), wanted)
    if pvc["spec"].get("volumeName") != name:
        raise kopf.TemporaryError(
            f"claim {pvc['metadata']['name']} belongs to another volume (a predecessor's, still being deleted); waiting", delay=10
        )
    return pv, pvc


async def _create(collection: str, wanted: dict) -> dict:
    found = await kube().create_or_get(collection, wanted)  # an earlier run of this handler may have made it
    if found is None:
        raise kopf.TemporaryError("object conflicts but cannot be read; retrying", delay=2)
    return found


async def _grow(body: dict, pv: dict) -> tuple[str, bool, str, str] | None:
    meta, spec = body["metadata"], body["spec"]
    have = placement.quantity_bytes(pv["spec"]["capacity"]["storage"]) // placement.GIB
    want = spec["sizeGb"]
    if want <= have:
        return None
    host = objects.host_of_pv(pv)
    async with _PLACING:
        hosts, placed = await _snapshot()
        me = placement.PlacedVolume(meta["namespace"], meta["name"], spec["app"], host, have)
        refused = placement.check_growth(me, want, hosts, placed)
        if refused:
            return ("Resized", False, refused.reason, f"spec.sizeGb {want} GB not applied, still {have} GB: {refused.message}")
        pv_patch, pvc_patch = objects.growth_patch(want)
        k = kube()
        await k.patch(core_path(None, "persistentvolumes", pv["metadata"]["name"]), pv_patch)
        await k.patch(core_path(meta["namespace"], "persistentvolumeclaims", objects.claim_name(meta["name"])), pvc_patch)
    return ("Resized", True, "Extended", f"extended from {have} GB to {want} GB in place on host {host}")


async def _wait_bound(namespace: str, claim: str, pvc: dict) -> dict:
    # The pre-bound pair binds within a sync of the PV controller; wait briefly
    # here rather than post a retry event for something this quick.
    deadline = time.monotonic() + 5
    while (pvc.get("status") or {}).get("phase") != "Bound" and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        pvc = await _read_pvc(namespace, claim) or pvc
    return pvc


async def _release_if_gone(body: dict) -> None:
    meta = body["metadata"]
    machine = (body.get("status") or {}).get("attachedMachine")
    if machine and not await _machine_exists(meta["namespace"], machine):
        await _detach_gone(meta["namespace"], meta["name"], machine)


async def _detach_gone(namespace: str, name: str, machine: str) -> None:
    """Clear attachedMachine naming a Machine that no longer exists (only if it still names it)."""
    async def detach(b: dict) -> dict | None:
        # Asked after each read of the volume: a new Machine of the same name may have claimed it since.
        if (b.get("status") or {}).get("attachedMachine") == machine and not await _machine_exists(namespace, machine):
            return {"attachedMachine": None}
        return None

    await update_status(PLURAL, namespace, name, detach)


async def refresh_redundancy(namespace: str, app: str) -> None:
    """Every Volume of the app re-judged: siblings coming and going change each other's condition."""
    items = await kube().list(custom_path(namespace, PLURAL))
    siblings = [
        redundancy.Sibling(v["metadata"]["name"], (v.get("spec") or {}).get("app", ""), (v.get("spec") or {}).get("region", ""),
                           deleting=bool(v["metadata"].get("deletionTimestamp")))
        for v in items
    ]
    for sibling in siblings:
        if sibling.app != app or sibling.deleting:
            continue
        await update_status(PLURAL, namespace, sibling.name, lambda b, s=sibling: _redundancy_patch(b, s, siblings))


def _redundancy_patch(body: dict, sibling: redundancy.Sibling, siblings: list[redundancy.Sibling]) -> dict | None:
    v = redundancy.verdict(sibling, siblings)
    return condition_patch(body, [(redundancy.CONDITION, v.redundant, v.reason, v.message)])


@kopf.on.resume(GROUP, VERSION, PLURAL, id="volume")
@kopf.on.create(GROUP, VERSION, PLURAL, id="volume")
@kopf.on.update(GROUP, VERSION, PLURAL, id="volume")
async def reconcile(body: kopf.Body, memo: kopf.Memo, logger, **_) -> None:
    started = time.monotonic()
    body = dict(body)
    meta = body["metadata"]
    result = acceptance.check(Volume, body)
    if not result.ok:
        # Nothing is created from a spec the models refuse.
        await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: {
            "conditions": result.conditions(b), "observedGeneration": meta.get("generation")})
        logger.warning(f"Volume refused: {result.message}")
        RECONCILES.labels("Volume", "invalid").inc()
        return
    # sizeGb reserves room at placement; nothing stops the data growing past it (docs/volumes.md).
    await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: condition_patch(
        b, [("Accepted", True, "SpecValid", result.message)], {"sizeLimit": SIZE_NOT_ENFORCED}))
    moving = ((await _get(meta["namespace"], meta["name"]) or body).get("status") or {}).get("migration") or {}
    if moving.get("phase") == "Switching":
        # The migration deletes and re-makes claim and PV now; making them here would pin them to the old host.
        raise kopf.TemporaryError("the volume's claim is moving to another host; waiting", delay=2)
    host = await _place(body, logger)
    if host is None:
        RECONCILES.labels("Volume", "unplaced").inc()
        await refresh_redundancy(meta["namespace"], body["spec"]["app"])
        message = get_condition((await _get(meta["namespace"], meta["name"]) or {}).get("status", {}).get("conditions"), "Placed")
        raise kopf.TemporaryError(f"not placed: {message['message'] if message else 'no host'}; retrying", delay=30)
    # A restore or fork fills the directory before there is a claim a Machine could mount.
    await restore.ensure_data(await _get(meta["namespace"], meta["name"]) or body, host, memo, logger)
    pv, pvc = await _ensure_objects(body, host)
    resized = await _grow(body, pv)
    pvc = await _wait_bound(meta["namespace"], pvc["metadata"]["name"], pvc)
    phase = (pvc.get("status") or {}).get("phase", "Pending")
    updates = [
        ("Placed", True, "Placed", f"pinned to host {host} in region {body['spec']['region']}"),
        ("Ready", phase == "Bound", "Bound" if phase == "Bound" else "ClaimPending",
         f"claim {pvc['metadata']['name']} is {phase}, on PersistentVolume {pv['metadata']['name']} on host {host}"),
    ]
    if resized:
        updates.append(resized)
    spec, fresh_status = body["spec"], ((await _get(meta["namespace"], meta["name"])) or body).get("status") or {}
    updates.append(snapshots.schedule_condition(
        store_configured=memo.object_store is not None, enabled=spec.get("scheduledSnapshots", True),
        interval_hours=spec.get("snapshotIntervalHours", 24), retention_days=spec.get("snapshotRetention", 5),
        next_at=fresh_status.get("nextSnapshotAt")))
    await _release_if_gone(await _get(meta["namespace"], meta["name"]) or body)
    extra = {"host": host, "persistentVolume": pv["metadata"]["name"], "claim": pvc["metadata"]["name"],
             "path": objects.path_of_pv(pv), "observedGeneration": meta.get("generation")}
    await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: condition_patch(b, updates, extra))
    await refresh_redundancy(meta["namespace"], body["spec"]["app"])
    RECONCILES.labels("Volume", "ready" if phase == "Bound" else "pending").inc()
    RECONCILE_SECONDS.labels("Volume").observe(time.monotonic() - started)
    if resized and not resized[1]:
        logger.warning(resized[3])
    if phase != "Bound":
        raise kopf.TemporaryError(f"claim {pvc['metadata']['name']} is still {phase}; waiting for it to bind", delay=5)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="volume")
async def delete(body: kopf.Body, logger, memo: kopf.Memo, **_) -> None:
    meta, spec = body["metadata"], body.get("spec") or {}
    fresh = await _get(meta["namespace"], meta["name"]) or dict(body)
    status = fresh.get("status") or {}
    machine = status.get("attachedMachine")
    if machine and await _machine_exists(meta["namespace"], machine):
        message = (f"deletion waits: the volume is attached to machine {machine}. "
                   f"Delete Machine {machine} to detach it; this volume is then deleted")
        blocked = get_condition(status.get("conditions"), "DeletionBlocked")
        if not blocked or blocked.get("status") != "True":
            kopf.warn(body, reason="VolumeAttached", message=message)
        await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: condition_patch(
            b, [("DeletionBlocked", True, "AttachedToMachine", message)]))
        raise kopf.TemporaryError(message, delay=5)
    k = kube()
    pv = status.get("persistentVolume") or objects.pv_name(meta["namespace"], meta["name"], meta["uid"])
    host, path = status.get("host"), status.get("path")
    if path is None and (found := await _read_pv(pv)) is not None:
        # A Volume whose status predates `path`: the PV is the record, read before it goes.
        host, path = objects.host_of_pv(found) or host, objects.path_of_pv(found)
        await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: {"path": path, "host": host})
    # Claim first, then the volume: the PV's protection finalizer lets it go once unbound.
    # A claim being deleted is never mounted again, so the directory can be wiped from here on.
    await k.delete(core_path(meta["namespace"], "persistentvolumeclaims", objects.claim_name(meta["name"])), missing_ok=True)
    await k.delete(core_path(None, "persistentvolumes", pv), missing_ok=True)
    if host and path:
        await _wipe(body, host, path, memo, logger)
    else:
        logger.info("volume deleted: it was never placed, so nothing was on a host")
    if spec.get("app"):
        await refresh_redundancy(meta["namespace"], spec["app"])


async def _wipe(body: kopf.Body, host: str, path: str, memo: kopf.Memo, logger) -> None:
    """Run the wipe pod on the host and wait for it (bounded); returns once the finalizer may go."""
    meta = body["metadata"]
    image = os.environ.get(IMAGE_ENV, "")
    left = None
    if wipe.relative_dir(path) is None:
        left = f"the directory {path} on host {host} is outside {objects.HOST_ROOT}: kubefly does not remove it"
    elif not image:
        left = (f"the directory {path} stays on host {host}: the operator has no image to wipe it with "
                f"({IMAGE_ENV} is unset; the chart sets it)")
    if left:
        kopf.warn(body, reason="DataLeftOnHost", message=left)
        logger.warning(left)
        return
    k = kube()
    v, pod_path, node = await wipe_pod.run(home=home_namespace(memo), meta=meta, host=host, path=path, image=image)
    if v.outcome == "waiting":
        await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: condition_patch(
            b, [("DeletionBlocked", True, v.reason, v.message)]))
        raise kopf.TemporaryError(v.message, delay=3)
    if v.outcome == "failed":
        blocked = get_condition(((await _get(meta["namespace"], meta["name"])) or {}).get("status", {}).get("conditions"),
                                "DeletionBlocked")
        if not blocked or blocked.get("reason") != v.reason:
            kopf.warn(body, reason=v.reason, message=v.message)
        await update_status(PLURAL, meta["namespace"], meta["name"], lambda b: condition_patch(
            b, [("DeletionBlocked", True, v.reason, v.message)]))
        # The failed pod goes, so the next attempt runs a fresh one.
        await k.delete(pod_path, missing_ok=True)
        raise kopf.TemporaryError(v.message, delay=30)
    if v.outcome == "wiped":
        await k.delete(pod_path, missing_ok=True)
        kopf.info(body, reason=v.reason, message=v.message)
        logger.info(f"volume deleted: {v.message}")
        return
    if node is None:
        await k.delete(pod_path, missing_ok=True)  # it can never run: its host is gone
    kopf.warn(body, reason=v.reason, message=v.message)
    logger.warning(f"volume deleted: {v.message}")


@kopf.on.event("pods", labels={wipe.ROLE: wipe.ROLE_VALUE})
async def wipe_pod_changed(type: str, body: kopf.Body, logger, **_) -> None:
    """A wipe pod left waiting on a NotReady host finishes when the host returns: it is removed then."""
    meta, status = body["metadata"], body.get("status") or {}
    if type == "DELETED" or status.get("phase") != "Succeeded" or meta.get("deletionTimestamp"):
        return
    labels, uid = meta.get("labels") or {}, (meta.get("annotations") or {}).get(wipe.UID_ANNOTATION)
    volume = await _get(labels.get(objects.NAMESPACE_LABEL, ""), labels.get(VOLUME_LABEL, ""))
    if volume is not None and volume["metadata"]["uid"] == uid:
        return  # its Volume's delete handler is waiting for it, and removes it
    await kube().delete(core_path(meta["namespace"], "pods", meta["name"]), missing_ok=True)
    logger.info(f"the directory {(meta.get('annotations') or {}).get(wipe.PATH_ANNOTATION)} of a deleted volume "
                f"was wiped on host {body['spec'].get('nodeName')}")


@kopf.on.event(GROUP, VERSION, "machines", id="volume-detach")
async def machine_event(type: str, namespace: str, name: str, **_) -> None:
    """A Machine gone for good releases any Volume still naming it (the Machine controller's backstop)."""
    if type != "DELETED":
        return
    for v in await kube().list(custom_path(namespace, PLURAL)):
        if (v.get("status") or {}).get("attachedMachine") == name:
            await _detach_gone(namespace, v["metadata"]["name"], name)
