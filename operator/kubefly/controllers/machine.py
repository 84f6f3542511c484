"""Machine controller: thin Kopf handlers around kubefly.machines.lifecycle.

Each Machine has a daemon (one asyncio task) that loops: read the machine and
the cluster snapshot (Kopf indices of nodes, pods, volumes, AppSecrets and
placed machines: no API listing per reconcile), call the pure planner, apply
its plan (claim the volume, patch status, create or delete the pod), then
sleep until something it depends on changes. Watch handlers wake it.

Placement is decided synchronously and recorded in RESERVED before the first
await, so two machines placed at the same moment never count the same room.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime, timezone

import kopf
import structlog
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge

from kubefly import GROUP, VERSION, platform
from kubefly import labels as kflabels
from kubefly.api.machine import Machine
from kubefly.conditions import set_condition
from kubefly.controllers import acceptance, gossipview
from kubefly.controllers.common import home_namespace, update_status, wait_woken
from kubefly.controllers.kubeapi import core_path, custom_path, kube
from kubefly.controllers.main import RECONCILE_SECONDS, RECONCILES
from kubefly.machines import lifecycle
from kubefly.machines.pod import SecretRef
from kubefly.placement import machines as placement

MACHINE_CREATES = Counter(
    "kubefly_machine_creates_total", "Machine creates (placements) by region and outcome", ["region", "outcome"]
)
MACHINES_BY_STATE = Gauge("kubefly_machines", "Machines by state", ["state"])
MAINTENANCE = Gauge("kubefly_platform_maintenance", "1 while the platform maintenance switch is on")
REGION_CLOSED = Gauge("kubefly_region_closed", "1 while a region takes no new machines", ["region"])

# A lazy proxy: logs.configure() runs after this module is imported.
log = structlog.get_logger("kubefly.controllers.machine")
# Wait between reconciles when nothing wakes a machine: a safety net, not the mechanism.
IDLE_RESYNC_S = 120.0
PLATFORM_POLL_S = 2.0

RESERVED: dict[tuple[str, str], placement.Placed] = {}
WAKERS: dict[tuple[str, str], asyncio.Event] = {}
MOUNTERS: dict[tuple[str, str], set[tuple[str, str]]] = {}  # (ns, volume) -> machines
BY_APP: dict[tuple[str, str], set[tuple[str, str]]] = {}  # (ns, app) -> machines
LATEST: dict[tuple[str, str], dict] = {}  # the machine as our own last status patch returned it
STATES: dict[tuple[str, str], str] = {}
HOST_READY: dict[str, bool] = {}
HOST_ADDRESS: dict[str, str] = {}  # host -> InternalIP, where its agent answers for the gossip view
ON_HOST: dict[tuple[str, str], str] = {}  # machine -> its host, for waking a host's machines
GOSSIP = gossipview.GossipView()
# Set by the chart when the host agents run (agent.enabled): the operator reads their gossip view, and
# pods get the routed readiness gate the agents write. Without it the Node alone decides, as on kwok.
AGENT_MEMBERS_PORT = os.environ.get("KUBEFLY_AGENT_MEMBERS_PORT")
PLATFORM = platform.PlatformSettings()
PLATFORM_REGIONS_SEEN: set[str] = set()


def wake(key: tuple[str, str]) -> None:
    if (ev := WAKERS.get(key)) is not None:
        ev.set()


# ---- indices: the cluster snapshot, fed by watches -------------------------
# Every handler here is async though none awaits: Kopf runs sync handlers in its
# thread pool, a thread hop per watch event (and wake() must run on the loop:
# asyncio.Event is not thread-safe).


@kopf.index("nodes")
async def hosts(name, body, status, **_):
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return {name: (placement.Host.of_node(body), ready.get("lastTransitionTime"))}


@kopf.index(GROUP, VERSION, "machines")
async def placed_machines(namespace, name, body, **_):
    placed = placement.Placed.of_machine(body)
    return {(namespace, name): placed} if placed else None


@kopf.index("pods", labels={kflabels.MANAGED_BY: kflabels.MANAGED_BY_VALUE})
async def machine_pods(namespace, labels: dict, body, **_):
    machine = labels.get(kflabels.MACHINE)
    return {(namespace, machine): lifecycle.pod_view(body)} if machine else None


@kopf.index(GROUP, VERSION, "volumes")
async def volumes(namespace, name, spec, status, meta, **_):
    migration = status.get("migration") or {}
    return {(namespace, name): lifecycle.VolumeView(
        name=name, app=spec.get("app", ""), region=spec.get("region", ""), host=status.get("host"),
        claim=status.get("claim"), attached=status.get("attachedMachine"), resource_version=meta.get("resourceVersion", ""),
        migration_phase=migration.get("phase"), migration_target=migration.get("target"),
        migrate_from=(meta.get("annotations") or {}).get(kflabels.MIGRATE_FROM),
    )}


@kopf.index(GROUP, VERSION, "appsecrets")
async def app_secrets(namespace, name, spec, status, **_):
    return {(namespace, spec.get("app")): (name, status.get("secretName"), status.get("digest") or "")}


def _one(index, key):
    store = index.get(key) if index is not None else None
    return next(iter(store), None) if store else None


# ---- watch handlers that wake the affected machines ------------------------


@kopf.on.event("pods", labels={kflabels.MANAGED_BY: kflabels.MANAGED_BY_VALUE})
async def pod_changed(namespace, labels: dict, **_):
    wake((namespace, labels.get(kflabels.MACHINE)))


def node_address(name: str, type: str | None, status: dict | None) -> None:
    address = next((a.get("address") for a in (status or {}).get("addresses") or [] if a.get("type") == "InternalIP"), None)
    if type == "DELETED" or not address:
        HOST_ADDRESS.pop(name, None)
    else:
        HOST_ADDRESS[name] = address


@kopf.on.event("nodes")
async def node_changed(name, type, status, placed_machines: kopf.Index, **_):
    ready = type != "DELETED" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (status or {}).get("conditions") or []
    )
    node_address(name, type, status)
    if HOST_READY.get(name) == ready and type != "DELETED":
        return
    HOST_READY[name] = ready
    # Room changed (a host came or went) or a host's machines must say so: wake those and the failed ones' peers.
    for key, store in placed_machines.items():
        if any(p.host == name for p in store):
            wake(key)
    for key, p in RESERVED.items():
        if p.host == name:
            wake(key)
    if ready:
        # A Machine that found no host accepting machines (HostUnavailable) is placed now.
        for key, state in list(STATES.items()):
            if state == "failed":
                wake(key)


def _wake_hosts(hosts: set[str]) -> None:
    for key, host in list(ON_HOST.items()):
        if host in hosts:
            wake(key)


@kopf.on.startup()
async def start_gossip_view(memo: kopf.Memo, **_) -> None:
    port = AGENT_MEMBERS_PORT
    memo.gossip_stop = asyncio.Event()
    memo.gossip_task = None
    if not port:
        return
    # Machines are reconciled only after the first round: a leader starting right after an API outage
    # finds every Node NotReady for a few seconds and must not take that for host loss.
    try:
        for node in await kube().list(core_path(None, "nodes")):
            node_address(node["metadata"]["name"], "ADDED", node.get("status"))
    except (ApiException, OSError, asyncio.TimeoutError) as exc:
        log.warning("cannot list hosts for the gossip view; it starts with the Node watch", error=str(exc))
    memo.gossip_task = asyncio.create_task(
        gossipview.poll(GOSSIP, lambda: dict(HOST_ADDRESS), int(port), _wake_hosts, memo.gossip_stop))
    deadline = time.monotonic() + 2 * gossipview.POLL_S
    while GOSSIP.at is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


@kopf.on.cleanup()
async def stop_gossip_view(memo: kopf.Memo, **_) -> None:
    memo.gossip_stop.set()
    if memo.gossip_task is not None:
        await memo.gossip_task


@kopf.on.event(GROUP, VERSION, "volumes")
async def volume_changed(namespace, name, **_):
    for key in MOUNTERS.get((namespace, name), ()):
        wake(key)


@kopf.on.event(GROUP, VERSION, "appsecrets")
async def appsecret_changed(namespace, spec, **_):
    for key in BY_APP.get((namespace, spec.get("app")), ()):
        wake(key)


@kopf.on.event(GROUP, VERSION, "machines")
async def machine_changed(namespace, name, type, status, meta, **_):
    key = (namespace, name)
    old, new = STATES.get(key), None if type == "DELETED" else (status or {}).get("state")
    if old != new:
        if old:
            MACHINES_BY_STATE.labels(old).dec()
        if new:
            MACHINES_BY_STATE.labels(new).inc()
        if new is None:
            STATES.pop(key, None)
        else:
            STATES[key] = new
    mine = LATEST.get(key)
    if mine is not None and type != "DELETED" and mine["metadata"].get("resourceVersion") == meta.get("resourceVersion"):
        return  # the echo of our own status write: the daemon already knows it
    wake(key)


# ---- platform settings ------------------------------------------------------


async def _watch_platform(ns: str, stop: asyncio.Event) -> None:
    """Poll the one ConfigMap (a namespaced Role allows only that): cheap and needs no cluster-wide read."""
    global PLATFORM
    last_error = None
    while not stop.is_set():
        try:
            cm = await kube().get(core_path(ns, "configmaps", platform.CONFIGMAP))
            settings = platform.parse((cm or {}).get("data"))
            last_error = None
        except ApiException as exc:
            settings = PLATFORM if exc.status != 404 else platform.PlatformSettings()
            if exc.status != 404 and last_error != exc.status:
                log.error("cannot read the platform settings", configmap=f"{ns}/{platform.CONFIGMAP}", status=exc.status)
            last_error = exc.status
        except ValueError as exc:
            settings = PLATFORM
            if last_error != str(exc):
                log.error("platform settings refused; keeping the previous ones", error=str(exc))
            last_error = str(exc)
        if settings != PLATFORM:
            PLATFORM = settings
            MAINTENANCE.set(1 if settings.maintenance else 0)
            for region in settings.closed_regions | PLATFORM_REGIONS_SEEN:
                REGION_CLOSED.labels(region).set(1 if region in settings.closed_regions else 0)
            PLATFORM_REGIONS_SEEN.update(settings.closed_regions)
            log.info("platform settings changed", maintenance=bool(settings.maintenance),
                     closed_regions=sorted(settings.closed_regions))
            for key in list(WAKERS):
                wake(key)
        try:
            await asyncio.wait_for(stop.wait(), PLATFORM_POLL_S)
        except TimeoutError:
            pass


@kopf.on.startup()
async def start_platform_watch(memo: kopf.Memo, **_) -> None:
    memo.platform_stop = asyncio.Event()
    home = home_namespace(memo)
    memo.platform_task = asyncio.create_task(_watch_platform(home, memo.platform_stop))


@kopf.on.cleanup()
async def stop_platform_watch(memo: kopf.Memo, **_) -> None:
    memo.platform_stop.set()
    await memo.platform_task


# ---- the machine's daemon ----------------------------------------------------


def _fresher(live: dict, mine: dict | None) -> dict:
    """The live (watched) body, unless our own last patch is newer than what the watch delivered yet."""
    if mine is None:
        return live
    try:
        if int(mine["metadata"]["resourceVersion"]) > int(live["metadata"]["resourceVersion"]):
            return mine
    except (KeyError, ValueError):
        pass
    return live


def _secrets(spec: dict, namespace: str, index) -> tuple[list[SecretRef] | None, str]:
    found = {name: (secret, digest) for name, secret, digest in (index.get((namespace, spec["app"])) or ())}
    wanted = spec.get("secrets")
    names = sorted(found) if wanted is None else sorted(wanted)
    missing = [n for n in names if n not in found or not found[n][0]]
    if missing:
        where = "spec.secrets" if wanted is not None else f"AppSecrets of app {spec['app']}"
        return None, f"{where}: waiting for AppSecret(s) {', '.join(missing)} (missing or not materialised yet)"
    return [SecretRef(n, found[n][0], found[n][1]) for n in names], ""


def _world(machine: dict, *, hosts, placed_machines, machine_pods, volumes, app_secrets) -> lifecycle.World:
    meta, spec, status = machine["metadata"], machine.get("spec") or {}, machine.get("status") or {}
    key = (meta["namespace"], meta["name"])
    verdict = acceptance.check(Machine, machine)
    if not verdict.ok:
        return lifecycle.World(machine, False, verdict.message, datetime.now(timezone.utc))
    mounts = spec.get("mounts") or []
    volume = _one(volumes, (key[0], mounts[0]["volume"])) if mounts else None
    secrets, missing = _secrets(spec, key[0], app_secrets)
    pod = _one(machine_pods, key)
    decision = None
    # A machine a drain moves is placed again once its pod on the old host is gone.
    leave = lifecycle.moving_off(machine) if pod is None else None
    if (leave or not status.get("host")) and (not mounts or (volume and volume.host and volume.claim)):
        cpu, mem = placement.guest_requests(spec.get("guest"))
        request = placement.Request(key, f"{key[0]}/{spec['app']}", spec["region"], cpu, mem,
                                    volume=mounts[0]["volume"] if mounts else None,
                                    volume_host=volume.host if volume else None, avoid_host=leave)
        taken = {k: p for k, store in placed_machines.items() for p in store}
        taken.update(RESERVED)
        decision = placement.place(request, (h for h, _ in (next(iter(s)) for s in hosts.values())),
                                   taken.values(), PLATFORM.closed_regions)
    host_entry = _one(hosts, status["host"]) if status.get("host") else None
    if volume is not None and volume.host and status.get("host") and volume.host != status["host"]:
        host_entry = _one(hosts, volume.host)  # its volume migrated: the machine follows (lifecycle._migrate)
    if decision is not None and decision.ok:
        host_entry = _one(hosts, decision.host)
    health = (lifecycle.HostHealth(host_entry[0].name, host_entry[0].ready, host_entry[1], GOSSIP.state(host_entry[0].name))
              if host_entry else None)
    return lifecycle.World(
        machine, True, verdict.message, datetime.now(timezone.utc),
        pod=pod, host=health, volume=volume, secrets=secrets, secrets_missing=missing,
        decision=decision, platform=PLATFORM, agents=bool(AGENT_MEMBERS_PORT),
    )


def _status_patch(old: dict, new: dict) -> dict:
    return {k: new.get(k) for k in (*lifecycle.OWNED_STATUS, "observedGeneration") if new.get(k) != old.get(k)}


async def _apply(machine: dict, plan: lifecycle.Plan, logger) -> dict | None:
    meta, spec = machine["metadata"], machine.get("spec") or {}
    ns, name = meta["namespace"], meta["name"]
    key = (ns, name)
    k = kube()
    if plan.placement is not None and plan.placement.ok:
        cpu, mem = placement.guest_requests(spec.get("guest"))
        RESERVED[key] = placement.Placed(key, f"{ns}/{spec['app']}", plan.placement.host, cpu, mem)
    try:
        if plan.attach_volume is not None:
            v = plan.attach_volume
            await k.patch_status(custom_path(ns, "volumes", v.name),
                                 {"metadata": {"resourceVersion": v.resource_version}, "status": {"attachedMachine": name}})
            kopf.event(machine, type="Normal", reason="VolumeAttached", message=f"claimed volume {v.name}")
        if plan.migrate_volume is not None:
            volume, host = plan.migrate_volume
            await k.patch(custom_path(ns, "volumes", volume), {"metadata": {"annotations": {kflabels.MIGRATE_FROM: host}}})
        updated = None
        patch = _status_patch(machine.get("status") or {}, plan.status)
        if patch:
            updated = await k.patch_status(custom_path(ns, "machines", name), {"status": patch})
    except BaseException:
        if plan.placement is not None and plan.placement.ok:
            RESERVED.pop(key, None)
        raise
    if plan.placement is not None:
        MACHINE_CREATES.labels(spec.get("region", ""), "placed" if plan.placement.ok else plan.placement.reason).inc()
    for type_, reason, message in plan.events:
        kopf.event(machine, type=type_, reason=reason, message=message)
    if patch.get("state"):
        log.info("machine state", namespace=ns, name=name, state=patch["state"], host=plan.status.get("host"))
    if plan.pod_conditions:
        await k.patch(core_path(ns, "pods", name) + "/status", {"status": {"conditions": plan.pod_conditions}},
                      missing_ok=True)
    if plan.delete_pod_grace is not None:
        await k.delete(core_path(ns, "pods", name), grace_period_seconds=plan.delete_pod_grace, missing_ok=True)
    if plan.create_pod is not None:
        # Already there (409): a restarted operator finds what it made. The answer is not needed.
        try:
            await k.create(core_path(ns, "pods"), plan.create_pod, exists_ok=True, parse=False)
        except ApiException as exc:
            if exc.status not in lifecycle.POD_REFUSED_STATUSES:
                raise
            return await _pod_refused(updated or machine, exc)
    return updated


async def _pod_refused(machine: dict, exc: ApiException) -> dict | None:
    """The API server refused the pod (invalid, admission, quota): the user sees why on the
    Machine, and this spec is not tried again (lifecycle.reconcile) until it changes."""
    meta = machine["metadata"]
    try:
        why = json.loads(exc.body or "{}").get("message") or exc.reason
    except ValueError:
        why = exc.reason
    message = lifecycle.pod_refused_message(exc.status, str(why))
    conds = set_condition((machine.get("status") or {}).get("conditions"), "Ready", False, lifecycle.POD_REFUSED,
                          message, meta.get("generation"))
    kopf.event(machine, type="Warning", reason=lifecycle.POD_REFUSED, message=message)
    return await kube().patch_status(custom_path(meta["namespace"], "machines", meta["name"]),
                                     {"status": {"state": "failed", "conditions": conds}})


@kopf.daemon(GROUP, VERSION, "machines", id="machine", cancellation_timeout=5.0)
async def run_machine(stopped: kopf.DaemonStopped, body: kopf.Body, namespace, name, logger,
                      hosts: kopf.Index, placed_machines: kopf.Index, machine_pods: kopf.Index,
                      volumes: kopf.Index, app_secrets: kopf.Index, **_) -> None:
    key = (namespace, name)
    waker = WAKERS.setdefault(key, asyncio.Event())
    backoff = 0.0
    while not stopped:
        waker.clear()
        started = time.monotonic()
        # A shallow snapshot is enough: Kopf replaces the body's source on each event (never
        # mutates it), and the planner builds new status values (a deep copy cost 6% of a burst).
        machine = _fresher(dict(body), LATEST.get(key))
        spec = machine.get("spec") or {}
        if (machine.get("status") or {}).get("host"):
            ON_HOST[key] = machine["status"]["host"]
        if spec.get("app"):
            BY_APP.setdefault((namespace, spec["app"]), set()).add(key)
        for m in spec.get("mounts") or []:
            MOUNTERS.setdefault((namespace, m.get("volume")), set()).add(key)
        outcome, timeout = "accepted", IDLE_RESYNC_S
        try:
            world = _world(machine, hosts=hosts, placed_machines=placed_machines, machine_pods=machine_pods,
                           volumes=volumes, app_secrets=app_secrets)
            outcome = "accepted" if world.accepted else "invalid"
            plan = lifecycle.reconcile(world)
            updated = await _apply(machine, plan, logger)
            if updated is not None:
                LATEST[key] = updated
            backoff = 0.0
        except ApiException as exc:
            outcome, backoff = "error", min(max(backoff * 2, 0.5), 30.0)
            timeout = backoff
            # 409 on the volume claim or a stale status write: someone else moved first; look again.
            (log.info if exc.status == 409 else log.error)(
                "reconcile did not apply", namespace=namespace, name=name, status=exc.status, reason=exc.reason)
        except Exception:
            outcome, backoff = "error", min(max(backoff * 2, 0.5), 30.0)
            timeout = backoff
            log.exception("reconcile failed", namespace=namespace, name=name)
        RECONCILES.labels("Machine", outcome).inc()
        RECONCILE_SECONDS.labels("Machine").observe(time.monotonic() - started)
        await wait_woken(waker, stopped, timeout)


@kopf.on.delete(GROUP, VERSION, "machines", id="destroy")
async def destroy_machine(body, namespace, name, spec, status, patch, machine_pods: kopf.Index, hosts: kopf.Index, **_):
    """Destroy: stop the pod (honouring the stop timeout), release the volume, never delete it."""
    key, k = (namespace, name), kube()
    pod = _one(machine_pods, key)
    if pod is not None:
        if status.get("state") != "destroying":
            patch.status["state"] = "destroying"
        host = _one(hosts, status.get("host")) if status.get("host") else None
        # A lost host never confirms the stop: remove the pod outright instead of waiting for ever.
        grace = (spec.get("stop") or {}).get("timeoutSeconds", 5) if host and host[0].ready else 0
        if not pod.deleting or grace == 0:
            await k.delete(core_path(namespace, "pods", name), grace_period_seconds=grace, missing_ok=True)
        raise kopf.TemporaryError("waiting for the machine's pod to stop", delay=1)
    for m in spec.get("mounts") or []:
        await _release_volume(namespace, m["volume"], name)
    for table in (RESERVED, LATEST, WAKERS, ON_HOST):
        table.pop(key, None)
    for machines in (*MOUNTERS.values(), *BY_APP.values()):
        machines.discard(key)
    kopf.event(body, type="Normal", reason="Destroyed", message="the machine is destroyed")


async def _release_volume(namespace: str, volume: str, machine: str) -> None:
    # Only ever clear our own claim, judged on each fresh read.
    await update_status("volumes", namespace, volume, lambda v: {"attachedMachine": None}
                        if (v.get("status") or {}).get("attachedMachine") == machine else None)
