"""PostgresBackup controller: a thin timer around kubefly.postgres.backups.step.

Every few seconds while a backup is unfinished: read it and its cluster, ask the member
it runs on (once Running) for its /health, let the planner say what is next, ask the
primary to start (POST /backup with the cluster's admin token), write status.
"""

from __future__ import annotations

from datetime import datetime, timezone

import aiohttp
import kopf
import structlog
from kubernetes.client.exceptions import ApiException

from kubefly import GROUP, VERSION
from kubefly.api.postgresbackup import PostgresBackup
from kubefly.api.postgrescluster import PostgresCluster
from kubefly.conditions import rfc3339
from kubefly.controllers import acceptance
from kubefly.controllers.common import update_status
from kubefly.controllers.kubeapi import core_path, custom_path, kube
from kubefly.controllers.main import RECONCILES
from kubefly.controllers.postgrescluster import PLURAL as CLUSTERS
from kubefly.controllers.postgrescluster import admin_token, member_health
from kubefly.postgres import backups
from kubefly.postgres import plan as pgplan

PLURAL = "postgresbackups"
INTERVAL_S = 3.0
ASK_TIMEOUT_S = 10.0

log = structlog.get_logger("kubefly.controllers.postgresbackup")


def _unfinished(status, **_) -> bool:
    return (status or {}).get("phase") not in backups.TERMINAL


async def _pod_ip(namespace: str, member: str) -> str | None:
    pod = await kube().get(core_path(namespace, "pods", member), missing_ok=True)
    return ((pod or {}).get("status") or {}).get("podIP")


async def _report(namespace: str, member: str, http: aiohttp.ClientSession) -> dict | None:
    """archive.backup of the member's /health ({} when it answers with none); None: no answer."""
    ip = await _pod_ip(namespace, member)
    body = (await member_health(http, ip))[0] if ip else None
    return None if body is None else ((body.get("archive") or {}).get("backup") or {})


async def _ask(b: PostgresBackup, cluster: PostgresCluster, member: str, http: aiohttp.ClientSession) -> str | None:
    """POST /backup on `member`; None when it took the request, else why not."""
    ns = b.metadata["namespace"]
    ip = await _pod_ip(ns, member)
    if not ip:
        return f"{member} has no running pod"
    token = await admin_token(ns, cluster.metadata["name"])
    request = {"id": b.metadata["uid"], "type": b.spec.type,
               "retention_days": cluster.spec.backups.recovery_window_days}
    try:
        async with http.post(f"http://{ip}:{pgplan.HEALTH_PORT}/backup", json=request,
                             headers={"Authorization": f"Bearer {token}"},
                             timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT_S, sock_connect=2)) as resp:
            if resp.status == 202:
                return None
            return f"{member} answered HTTP {resp.status}: {(await resp.text())[:300]}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{member} did not answer: {type(exc).__name__}"


@kopf.timer(GROUP, VERSION, PLURAL, id="postgresbackup", interval=INTERVAL_S, when=_unfinished)
async def advance(body: kopf.Body, namespace, name, logger, **_) -> None:
    verdict = acceptance.check(PostgresBackup, dict(body))
    if not verdict.ok:
        await update_status(PLURAL, namespace, name, lambda _b: {"phase": "Failed", "message": verdict.message[:1024]})
        RECONCILES.labels("PostgresBackup", "invalid").inc()
        return
    b = PostgresBackup.model_validate(dict(body))
    now = datetime.now(timezone.utc)
    raw = await kube().get(custom_path(namespace, CLUSTERS, b.spec.cluster), missing_ok=True)
    cluster = PostgresCluster.model_validate(raw) if raw and acceptance.check(PostgresCluster, raw).ok else None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
        running = b.status is not None and b.status.phase == "Running" and b.status.member
        report = await _report(namespace, b.status.member, http) if running else None
        step = backups.step(b, cluster, report, now=now)
        status = dict(step.status)
        if step.action == "start":
            refused = await _ask(b, cluster, step.member, http)
            if refused is None:
                status = {"phase": "Running", "member": step.member, "startedAt": rfc3339(now),
                          "message": f"running on {step.member}",
                          "archivePath": (raw.get("status") or {}).get("archivePath")}
                logger.info(f"backup started on {step.member}")
            else:
                status = {"phase": "Pending", "message": f"not started yet: {refused}"[:1024]}
    current = dict(body.get("status") or {})
    patch = {k: v for k, v in status.items() if v is not None and current.get(k) != v}
    if patch:
        try:
            await update_status(PLURAL, namespace, name, lambda _b: patch)
        except ApiException as exc:
            log.error("status not written", namespace=namespace, name=name, status=exc.status)
        if patch.get("phase") in backups.TERMINAL:
            (logger.info if patch["phase"] == "Completed" else logger.warning)(f"backup {patch['phase']}: {patch['message']}")
    RECONCILES.labels("PostgresBackup", step.action).inc()
