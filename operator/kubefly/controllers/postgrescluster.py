"""PostgresCluster controller: thin Kopf handlers around kubefly.postgres.plan and .status.

One daemon per cluster loops: reconcile the children (read them, call the pure
planner, apply with create-if-absent under deterministic names) when something
changed or every RESYNC_S, and every POLL_S poll each member's /health on its
pod IP (1 s timeouts, concurrently, off any handler's hot path), label the pods
with their role and write status. repmgr elects; this only observes and labels.

Credentials: `<cluster>-credentials` (Secret, generated here, the one the apps
read) and an AppSecret of the same name sealed from it, which the Machine
controller injects into the members' environment. Values never reach a log,
an event or the custom resource.

Removal of a member (scale down, host loss): its Machine and Service go; with
deletePolicy keepVolumes its Volume stays, labelled retired; deleteVolumes deletes it.

Deletion: Machines, Services and the AppSecret are owned and garbage-collected.
With deletePolicy keepVolumes (default) the finalizer first drops the
cluster's ownerReference from the Volumes and the credentials Secret, so the
data and the passwords that open it stay; a new cluster of the same name
adopts both.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import secrets as pysecrets
import time
from datetime import datetime, timezone

import aiohttp
import kopf
import structlog
from kubernetes.client.exceptions import ApiException

from kubefly import GROUP, VERSION, labels
from kubefly.api.postgresbackup import PostgresBackup
from kubefly.api.postgrescluster import PostgresCluster
from kubefly.conditions import get_condition, now_rfc3339, parse_rfc3339
from kubefly.controllers import acceptance
from kubefly.controllers.common import condition_patch, update_status, wait_woken
from kubefly.controllers.kubeapi import core_path, custom_path, kube
from kubefly.controllers.main import RECONCILE_SECONDS, RECONCILES
from kubefly.placement.volumes import host_of_node
from kubefly.objectstore import access as store_access
from kubefly.postgres import archiver, backups, decide
from kubefly.postgres import pgbackrest as pb
from kubefly.postgres import plan as pgplan
from kubefly.postgres import restore as pgrestore
from kubefly.postgres import status as pgstatus
from kubefly.secrets import sealing

PLURAL = "postgresclusters"
POLL_S = 2.0
RESYNC_S = 15.0
HEALTH_TIMEOUT_S = 1.0
HOST_LOSS_GRACE_S = 60.0
SWITCHOVER_TIMEOUT_S = 180.0
IMAGE_ENV = "KUBEFLY_POSTGRES_IMAGE"
# On the archive AppSecret: the access key id its sealed secret key belongs to.
ARCHIVE_KEY_ID = f"{labels.PREFIX}/archive-access-key-id"

log = structlog.get_logger("kubefly.controllers.postgrescluster")
WAKERS: dict[tuple[str, str], asyncio.Event] = {}


def image(version: int) -> str:
    return os.environ.get(IMAGE_ENV) or f"kubefly-postgres:{version}"


def wake(namespace: str, name: str | None) -> None:
    if name and (ev := WAKERS.get((namespace, name))) is not None:
        ev.set()


# Async, so wake() runs on the loop (asyncio.Event is not thread-safe; Kopf runs sync handlers in threads).
@kopf.on.event(GROUP, VERSION, PLURAL)
async def cluster_changed(namespace, name, **_):
    wake(namespace, name)


@kopf.on.event(GROUP, VERSION, "machines", labels={pgplan.CLUSTER_LABEL: kopf.PRESENT})
async def member_machine_changed(namespace, labels: dict, **_):
    wake(namespace, labels.get(pgplan.CLUSTER_LABEL))


@kopf.on.event(GROUP, VERSION, "volumes", labels={pgplan.CLUSTER_LABEL: kopf.PRESENT})
async def member_volume_changed(namespace, labels: dict, **_):
    wake(namespace, labels.get(pgplan.CLUSTER_LABEL))


# ---- reconcile the children ----------------------------------------------------


class Snapshot:
    def __init__(self, cluster: pgplan.Cluster):
        self.c = cluster

    async def read(self) -> None:
        k = kube()
        sel = f"{pgplan.CLUSTER_LABEL}={self.c.name}"
        ns = self.c.namespace
        vols, machines, services, nodes = await asyncio.gather(
            k.list(custom_path(ns, "volumes"), label_selector=sel),
            k.list(custom_path(ns, "machines"), label_selector=sel),
            k.list(core_path(ns, "services"), label_selector=sel),
            k.list(core_path(None, "nodes")),
        )
        by_index: dict[int, dict] = {}
        for kind, items in (("volume", vols), ("machine", machines)):
            for obj in items:
                idx = (obj["metadata"].get("labels") or {}).get(pgplan.MEMBER_LABEL, "")
                if idx.isdigit():
                    by_index.setdefault(int(idx), {})[kind] = obj
        self.members = [pgplan.Member(i, d.get("volume"), d.get("machine")) for i, d in sorted(by_index.items())]
        self.services = {s["metadata"]["name"]: s for s in services}
        self.hosts = [pgplan.Host(h.name, h.region, h.schedulable) for h in map(host_of_node, nodes)]


async def _ensure_credentials(c: pgplan.Cluster, memo) -> None:
    k = kube()
    name = pgplan.credentials_name(c.name)
    path = core_path(c.namespace, "secrets", name)
    secret = await k.get(path, missing_ok=True)
    if secret is None:
        values = {"username": pgplan.SUPERUSER, "password": pysecrets.token_urlsafe(24),
                  "repmgr-password": pysecrets.token_urlsafe(24), "admin-token": pysecrets.token_urlsafe(32)}
        # An earlier pass may have made it: then its passwords stand.
        secret = await k.create_or_get(core_path(c.namespace, "secrets"), pgplan.build_credentials(c, values))
    elif not any(ref.get("uid") == c.uid for ref in secret["metadata"].get("ownerReferences") or []):
        # Kept from a deleted cluster of the same name (keepVolumes): its passwords open the kept data.
        # A strategic merge adds to ownerReferences (merge key uid).
        await k.patch(path, {"metadata": {"ownerReferences": [pgplan.owner(c)]}}, missing_ok=True)
    if await k.get(custom_path(c.namespace, "appsecrets", name), missing_ok=True) is None:
        values = {env: base64.b64decode(secret["data"][key]).decode() for env, key in pgplan.MEMBER_ENV_SECRETS.items()}
        await k.create(custom_path(c.namespace, "appsecrets"), _sealed(c, memo, name, values), exists_ok=True, parse=False)


def _sealed(c: pgplan.Cluster, memo, name: str, values: dict[str, str], annotations: dict | None = None) -> dict:
    """An AppSecret of the cluster's app holding `values` (env name -> value), sealed for its members."""
    public = memo.sealing_key.public_key()
    data = {env: sealing.seal(public, namespace=c.namespace, app=c.spec["app"], key=env, value=value)
            for env, value in values.items()}
    meta = pgplan.object_meta(c, name)
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AppSecret", "metadata": meta,
            "spec": {"app": c.spec["app"], "data": data}}


def _archive_of(namespace: str, cluster: str) -> str:
    """A cluster's archives (every lineage) under the store's bucket."""
    return pgplan.archive_prefix(namespace).lstrip("/") + f"/{cluster}"


async def _restore(c: pgplan.Cluster, model: PostgresCluster, archive_problem: tuple[str, str] | None
                   ) -> tuple[pb.RestoreFrom | None, tuple[str, str] | None, dict | None]:
    """spec.restore: (what member 0 restores, why nothing can be, a new status.restore to record)."""
    if model.spec.restore is None:
        return None, None, None
    if model.status is not None and model.status.restore is not None:
        return pgrestore.from_status(model.status.restore), None, None
    if archive_problem is not None:
        return None, (archive_problem[0], f"spec.restore reads the object store: {archive_problem[1]}"), None
    found = []
    for raw in await kube().list(custom_path(c.namespace, "postgresbackups")):
        if acceptance.check(PostgresBackup, raw).ok:
            found.append(PostgresBackup.model_validate(raw))
    answer = pgrestore.resolve(model, found, now=datetime.now(timezone.utc))
    if isinstance(answer, pgrestore.Refusal):
        return None, (answer.reason, answer.message), None
    return pgrestore.from_status(answer), None, answer.model_dump(by_alias=True, exclude_none=True)


def archive_tenant(namespace: str, cluster: str) -> str:
    # Dots never occur in a namespace or cluster name: no two clusters share a tenant.
    return f"pg.{namespace}.{cluster}"


async def _ensure_archive(c: pgplan.Cluster, memo, read_only: list[str]) -> tuple[pgplan.Archive | None,
                                                                                  tuple[str, str] | None]:
    """Where this cluster archives, with its own key scoped to its archive (and `read_only`, a restore's
    source); or why it cannot."""
    store = memo.object_store
    if store is None:
        return None, ("NoObjectStore", "the platform has no object store, so this cluster has no WAL archive and no "
                                       "backups: set the chart's objectStore.endpoint or objectStore.bundled.enabled")
    if not store.https_endpoint:
        return None, ("ObjectStoreNotHTTPS", f"pgBackRest reaches S3 only over https://, and the chart's "
                                             f"objectStore.endpoint is {store.endpoint}: give it an https:// endpoint")
    k = kube()
    home = memo.home_namespace
    try:
        keys = await store_access.grant(k, store, home, archive_tenant(c.namespace, c.name),
                                        [_archive_of(c.namespace, c.name)], read_only)
    except (store_access.NeedsBundledStore, store_access.TenantConflict) as exc:
        return None, ("ObjectStoreKeysUnavailable", str(exc))
    ca = None
    if store.ca_secret:
        tls = await k.get(core_path(home, "secrets", store.ca_secret), missing_ok=True)
        if tls is None or "ca.crt" not in (tls.get("data") or {}):
            return None, ("ObjectStoreKeysUnavailable", f"waiting for the store's CA (Secret {home}/{store.ca_secret})")
        ca = base64.b64decode(tls["data"]["ca.crt"]).decode()
    name = pgplan.archive_secret_name(c.name)
    path = custom_path(c.namespace, "appsecrets", name)
    have = await k.get(path, missing_ok=True)
    if have is None or (have["metadata"].get("annotations") or {}).get(ARCHIVE_KEY_ID) != keys.access_key_id:
        # Made, or re-sealed when the store issued another key (the members roll with the AppSecret).
        body = _sealed(c, memo, name, {archiver.SECRET_KEY_ENV: keys.secret_access_key},
                       {ARCHIVE_KEY_ID: keys.access_key_id})
        if have is None:
            await k.create(custom_path(c.namespace, "appsecrets"), body, exists_ok=True, parse=False)
        else:
            await k.patch(path, {"metadata": {"annotations": body["metadata"]["annotations"]}, "spec": body["spec"]})
    return pgplan.Archive(endpoint=store.https_endpoint, bucket=store.bucket, region=store.region,
                          access_key_id=keys.access_key_id, ca_pem=ca), None


async def _apply(c: pgplan.Cluster, snap: Snapshot, p: pgplan.Plan, logger) -> None:
    k = kube()
    ns = c.namespace
    # Creates tolerate 409 (made by an earlier pass); patches and deletes tolerate 404 (gone meanwhile).
    for v in p.create_volumes:
        await k.create(custom_path(ns, "volumes"), v, exists_ok=True, parse=False)
    for name in p.reuse_volumes:
        # Before its Machine: a retired Volume with a Machine is a removal not done yet.
        await k.patch(custom_path(ns, "volumes", name), {"metadata": {"labels": {pgplan.RETIRED_LABEL: None}}},
                      missing_ok=True)
    for m in p.create_machines:
        await k.create(custom_path(ns, "machines"), m, exists_ok=True, parse=False)
    if p.create_machines:
        logger.info(f"members created: {', '.join(m['metadata']['name'] for m in p.create_machines)}")
    if p.reuse_volumes:
        logger.info(f"retired volumes taken back, their data rejoins: {', '.join(p.reuse_volumes)}")
    for name, size in p.grow_volumes:
        await k.patch(custom_path(ns, "volumes", name), {"spec": {"sizeGb": size}}, missing_ok=True)
    members = {m.index: m for m in snap.members}
    for plural, name in p.adopt:
        obj = next(m.volume for m in members.values() if m.volume and m.volume["metadata"]["name"] == name)
        refs = (obj["metadata"].get("ownerReferences") or []) + [pgplan.owner(c)]
        await k.patch(custom_path(ns, plural, name), {"metadata": {"ownerReferences": refs}}, missing_ok=True)
    if p.update_machine is not None:
        name, spec, digest = p.update_machine
        await k.patch(custom_path(ns, "machines", name),
                      {"metadata": {"annotations": {pgplan.SPEC_DIGEST: digest}}, "spec": spec}, missing_ok=True)
        logger.info(f"member {name} restarts with the current spec")
    for name in p.remove_members:
        await k.delete(custom_path(ns, "machines", name), missing_ok=True)
        await k.delete(core_path(ns, "services", name), missing_ok=True)
    for name in p.retire_volumes:
        await k.patch(custom_path(ns, "volumes", name), {"metadata": {"labels": {pgplan.RETIRED_LABEL: "true"}}},
                      missing_ok=True)
    for name in p.delete_volumes:
        # The Volume controller holds this until the Machine is gone.
        await k.delete(custom_path(ns, "volumes", name), missing_ok=True)
    if p.remove_members:
        logger.info(f"members removed: {', '.join(p.remove_members)}")
    if p.retire_volumes:
        logger.info(f"volumes kept (deletePolicy keepVolumes): {', '.join(p.retire_volumes)}; "
                    f"label {pgplan.RETIRED_LABEL}=true, delete them when the data is no longer wanted")
    for svc in p.services:
        have = snap.services.get(svc["metadata"]["name"])
        if have is None:
            await k.create(core_path(ns, "services"), svc, exists_ok=True, parse=False)
        elif (have.get("spec") or {}).get("selector") != svc["spec"]["selector"]:
            await k.patch(core_path(ns, "services", svc["metadata"]["name"]), {"spec": {"selector": svc["spec"]["selector"]}},
                          missing_ok=True)


# ---- scheduled backups ---------------------------------------------------------------


async def _schedule_backups(c: pgplan.Cluster, model: PostgresCluster, archiving: bool, logger) -> None:
    """spec.backups: a PostgresBackup when one is due; records past the recovery window go."""
    k = kube()
    ns, name = c.namespace, c.name
    sel = f"{pgplan.CLUSTER_LABEL}={name},{labels.SCHEDULED}=true"
    made = [backups.Scheduled(b["metadata"]["name"], parse_rfc3339(b["metadata"]["creationTimestamp"]),
                              (b.get("status") or {}).get("phase"))
            for b in await k.list(custom_path(ns, "postgresbackups"), label_selector=sel)]
    now = datetime.now(timezone.utc)
    for gone in backups.expired(model, made, now=now):
        await k.delete(custom_path(ns, "postgresbackups", gone), missing_ok=True)
    if (due := backups.due(model, made, now=now, archiving=archiving)) is not None:
        meta = pgplan.object_meta(c, due)
        meta["labels"][labels.SCHEDULED] = "true"
        # Not owned: the record of what the archive holds outlives the cluster (a restore reads it).
        del meta["ownerReferences"]
        await k.create(custom_path(ns, "postgresbackups"),
                       {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PostgresBackup", "metadata": meta,
                        "spec": {"cluster": name, "type": "full"}}, exists_ok=True, parse=False)
        logger.info(f"scheduled backup {due} created (spec.backups.intervalHours {model.spec.backups.interval_hours})")


# ---- health ---------------------------------------------------------------------


async def member_health(http: aiohttp.ClientSession, ip: str) -> tuple[dict | None, str | None]:
    """A member's /health answer, or why there is none."""
    try:
        async with http.get(f"http://{ip}:{pgplan.HEALTH_PORT}/health") as resp:
            if resp.status != 200:
                return None, f"HTTP {resp.status}"
            return await resp.json(), None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return None, f"{ip}:{pgplan.HEALTH_PORT} {type(exc).__name__}".strip()


async def _poll(c: pgplan.Cluster, members: list[str], views: dict, http: aiohttp.ClientSession) -> dict[str, tuple]:
    """name -> (pod, lag, error); updates `views` with every answer."""
    pods = await kube().list(core_path(c.namespace, "pods"), label_selector=f"{labels.APP}={c.spec['app']}")
    by_name = {p["metadata"]["name"]: p for p in pods if p["metadata"]["name"] in members}

    async def one(name: str):
        pod = by_name.get(name)
        ip = (pod.get("status") or {}).get("podIP") if pod else None
        if not ip:
            return name, pod, None, "no pod IP yet"
        body, error = await member_health(http, ip)
        if body is None:
            return name, pod, None, error
        try:
            views[name] = decide.View(decide.Report.from_json(body), time.monotonic())
        except (KeyError, TypeError, ValueError):
            return name, pod, None, "unreadable /health answer"
        return name, pod, body.get("lag_bytes"), None

    return {name: (pod, lag, err) for name, pod, lag, err in await asyncio.gather(*(one(n) for n in members))}


async def _label_pods(c: pgplan.Cluster, polled: dict, roles: dict) -> None:
    for name, (pod, _, _) in polled.items():
        if pod is None:
            continue
        have = pod["metadata"].get("labels") or {}
        want = {pgplan.CLUSTER_LABEL: c.name, pgplan.ROLE_LABEL: roles.get(name)}
        if any(have.get(k) != v for k, v in want.items()):
            await kube().patch(core_path(c.namespace, "pods", name), {"metadata": {"labels": want}}, missing_ok=True)


# ---- switchover ---------------------------------------------------------------------


async def admin_token(namespace: str, cluster: str) -> str:
    """The token the members' admin endpoints (/switchover, /backup) require."""
    secret = await kube().get(core_path(namespace, "secrets", pgplan.credentials_name(cluster)), missing_ok=True)
    if secret is None:
        raise RuntimeError(f"Secret {namespace}/{pgplan.credentials_name(cluster)} is missing")
    return base64.b64decode(secret["data"]["admin-token"]).decode()


async def _switchover(c: pgplan.Cluster, target: str, generation, http: aiohttp.ClientSession) -> None:
    k = kube()
    try:
        pod = await k.get(core_path(c.namespace, "pods", target), missing_ok=True)
        ip = (pod.get("status") or {}).get("podIP") if pod else None
        if not ip:
            raise RuntimeError(f"{target} has no running pod")
        token = await admin_token(c.namespace, c.name)
        async with http.post(f"http://{ip}:{pgplan.HEALTH_PORT}/switchover", json={},
                             headers={"Authorization": f"Bearer {token}"},
                             timeout=aiohttp.ClientTimeout(total=SWITCHOVER_TIMEOUT_S, sock_connect=2)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        outcome = (True, "Completed", f"{target} took over as primary")
    except (aiohttp.ClientError, TimeoutError, RuntimeError, ApiException) as exc:
        outcome = (False, "Failed", f"switchover to {target} failed: {type(exc).__name__} {exc}"[:1000])
    await update_status(PLURAL, c.namespace, c.name, lambda b: condition_patch(b, [("Switchover", *outcome)])
                  if b["metadata"].get("generation") == generation else None)


# ---- the daemon -------------------------------------------------------------------


def _cluster(body: dict) -> pgplan.Cluster:
    meta = body["metadata"]
    return pgplan.Cluster(meta["namespace"], meta["name"], meta["uid"], body["spec"], meta.get("generation"))


@kopf.daemon(GROUP, VERSION, PLURAL, id="postgrescluster", cancellation_timeout=5.0)
async def run_cluster(stopped: kopf.DaemonStopped, body: kopf.Body, namespace, name, memo, logger, **_) -> None:
    key = (namespace, name)
    waker = WAKERS.setdefault(key, asyncio.Event())
    views: dict[str, decide.View] = {}
    last_primary = (body.get("status") or {}).get("primary")
    last_reconcile, members, plan_conditions = 0.0, [], []
    archive_problem: tuple[str, str] | None = None
    restore_refusal: tuple[str, str] | None = None
    restore_status: dict | None = None
    snap: Snapshot | None = None
    switching: asyncio.Task | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as http:
        while not stopped:
            started = time.monotonic()
            dirty = waker.is_set()
            waker.clear()
            cluster = copy.deepcopy(dict(body))
            outcome = "observed"
            try:
                verdict = acceptance.check(PostgresCluster, cluster)
                if not verdict.ok:
                    # Nothing is built from a spec the models refuse.
                    await update_status(PLURAL, namespace, name, lambda b: condition_patch(
                        b, [("Accepted", False, "InvalidSpec", verdict.message),
                            ("Ready", False, "InvalidSpec", verdict.message)],
                        {"phase": "Invalid", "observedGeneration": b["metadata"].get("generation")}))
                    outcome = "invalid"
                else:
                    c = _cluster(cluster)
                    if dirty or snap is None or started - last_reconcile >= RESYNC_S:
                        model = PostgresCluster.model_validate(cluster)
                        await _ensure_credentials(c, memo)
                        source = model.spec.restore.from_ if model.spec.restore else None
                        archive, archive_problem = await _ensure_archive(
                            c, memo, [_archive_of(namespace, source)] if source and source != name else [])
                        restore, restore_refusal, restore_status = await _restore(c, model, archive_problem)
                        snap = Snapshot(c)
                        await snap.read()
                        if restore_refusal is None:
                            p = pgplan.plan(c, snap.members, snap.hosts, image=image(c.spec.get("version", 15)),
                                            primary=last_primary, now=datetime.now(timezone.utc),
                                            host_loss_grace_s=HOST_LOSS_GRACE_S, existing_services=snap.services,
                                            archive=archive, restore=restore)
                            await _apply(c, snap, p, logger)
                            members, plan_conditions = p.members, p.conditions
                        else:  # nothing is made of a restore that cannot be
                            members, plan_conditions = [], []
                        last_reconcile = started
                        outcome = "reconciled"
                    polled = await _poll(c, members, views, http)
                    for gone in set(views) - set(members):
                        del views[gone]
                    by_name = {pgplan.member_name(c.name, m.index): m for m in snap.members}
                    observed = [pgstatus.Observed(
                        n, host=by_name[n].host if n in by_name else None,
                        started=n in by_name and by_name[n].state == "started",
                        view=views.get(n, decide.View()), lag_bytes=polled[n][1], error=polled[n][2],
                        terminating=bool(((polled[n][0] or {}).get("metadata") or {}).get("deletionTimestamp")))
                        for n in members]
                    initialized = (get_condition((cluster.get("status") or {}).get("conditions"), "Initialized") or {}
                                   ).get("status") == "True"
                    j = pgstatus.judge(observed, desired=int(c.spec.get("members", 3)), now=time.monotonic(),
                                       now_rfc3339=now_rfc3339(), previous_primary=last_primary,
                                       switchover_to=c.spec.get("switchoverTo"), initialized=initialized)
                    await _label_pods(c, polled, j.roles)
                    if j.failover:
                        kopf.warn(cluster, reason="Failover", message=j.failover["reason"])
                    if j.primary is not None:
                        last_primary = j.primary
                    sw = pgstatus.switchover(c.spec.get("switchoverTo"), members=members, primary=j.primary,
                                             generation=c.generation,
                                             condition=get_condition((cluster.get("status") or {}).get("conditions"),
                                                                     "Switchover"))
                    updates = [("Accepted", True, "SpecValid", verdict.message), *j.conditions]
                    updates += [(x.type, x.ok, x.reason, x.message) for x in plan_conditions]
                    primary_view = views.get(j.primary) if j.primary else None
                    archive_report = primary_view.report.archive if primary_view and primary_view.report else None
                    archiving = pgstatus.archiving(archive_problem, j.primary, archive_report)
                    updates.append(archiving)
                    if c.spec.get("restore"):
                        resolved = restore_status or (cluster.get("status") or {}).get("restore")
                        described = (f"{resolved['from']}'s backup {resolved.get('backup')} "
                                     f"({resolved['type']} {resolved.get('target') or 'latest'})") if resolved else None
                        updates.append(pgstatus.restored(
                            restore_refusal, described, j.primary,
                            {n: v.report.restore for n, v in views.items() if v.report and v.report.restore}))
                    if sw.action != "none":
                        updates.append(("Switchover", sw.action == "done", sw.reason, sw.message))
                    if sw.action == "attempt" and (switching is None or switching.done()):
                        switching = asyncio.create_task(_switchover(c, c.spec["switchoverTo"], c.generation, http))
                    extra = {"phase": j.phase, "primary": j.primary, "readyMembers": j.ready, "members": j.members,
                             "timeline": j.timeline, "credentialsSecret": pgplan.credentials_name(c.name),
                             "observedGeneration": c.generation}
                    if archive_report and archive_report.get("path"):
                        extra["archivePath"] = archive_report["path"]
                    if j.failover:
                        extra["lastFailover"] = j.failover
                    if restore_status is not None:
                        extra["restore"] = restore_status
                    await update_status(PLURAL, namespace, name, lambda b: condition_patch(b, updates, extra))
                    if outcome == "reconciled":
                        await _schedule_backups(c, model, archiving[1], logger)
            except ApiException as exc:
                outcome = "error"
                log.error("reconcile did not apply", namespace=namespace, name=name, status=exc.status, reason=exc.reason)
            except Exception:
                outcome = "error"
                log.exception("reconcile failed", namespace=namespace, name=name)
            RECONCILES.labels("PostgresCluster", outcome).inc()
            RECONCILE_SECONDS.labels("PostgresCluster").observe(time.monotonic() - started)
            await wait_woken(waker, stopped, POLL_S)
        if switching is not None and not switching.done():
            switching.cancel()
    WAKERS.pop(key, None)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="postgrescluster")
async def delete(body: kopf.Body, namespace, name, spec, memo, logger, **_) -> None:
    """The cluster's store key goes (its archive stays, for a restore). keepVolumes: release the
    Volumes and the credentials Secret from garbage collection before it runs."""
    store = memo.object_store
    if store is not None and store.https_endpoint:
        try:
            await store_access.revoke(kube(), store, memo.home_namespace, archive_tenant(namespace, name))
        except store_access.NeedsBundledStore:
            pass
    if spec.get("deletePolicy", "keepVolumes") != "keepVolumes":
        logger.info("cluster deleted with deletePolicy deleteVolumes: its Volumes go with it")
        return
    k = kube()
    uid = body["metadata"]["uid"]
    sel = f"{pgplan.CLUSTER_LABEL}={name}"
    kept = []
    for v in await k.list(custom_path(namespace, "volumes"), label_selector=sel):
        refs = v["metadata"].get("ownerReferences") or []
        if any(r.get("uid") == uid for r in refs):
            await k.patch(custom_path(namespace, "volumes", v["metadata"]["name"]),
                          {"metadata": {"ownerReferences": [r for r in refs if r.get("uid") != uid]}})
        kept.append(v["metadata"]["name"])
    secret_name = pgplan.credentials_name(name)
    # A strategic merge directive: drop only this cluster's reference (merge key uid).
    await k.patch(core_path(namespace, "secrets", secret_name),
                  {"metadata": {"ownerReferences": [{"$patch": "delete", "uid": uid}]}}, missing_ok=True)
    logger.info(f"cluster deleted; kept Volumes {', '.join(sorted(kept)) or '(none)'} and Secret {secret_name} "
                "(deletePolicy keepVolumes): a new PostgresCluster of the same name adopts them")
