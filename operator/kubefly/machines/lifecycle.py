"""A Machine's life as a pure function: (machine, its pod, its host, ...) -> plan.

`reconcile(world)` looks at one Machine and everything it depends on, as the
controller last saw them, and returns the status to write and at most one
action on the pod. It is level-based and idempotent: running it twice on the
same world asks for the same thing, so a restarted operator, or a stale watch,
can at worst repeat a create (AlreadyExists) or a delete (NotFound).

States (Fly's words): created (placed, never booted: desired state stopped at
create, like skip_launch; condition Stopped True), starting, started, stopping, stopped, replacing
(spec or secrets changed: the pod is being replaced on the same host),
destroying, failed (could not be created: capacity, volume, invalid spec).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kubefly import labels
from kubefly.conditions import get_condition, set_condition
from kubefly.machines.pod import CHECKS_GATE, ROUTED_GATE, SECRETS_DIGEST, readiness_gates, routed_condition, SPEC_DIGEST, SecretRef, build_pod, instance_id, spec_digest
from kubefly.placement.machines import Decision
from kubefly.platform import PlatformSettings
from kubefly.volumes.migration import MACHINE_STOPPED as MIGRATION_STOPS_MACHINE

MAX_EVENTS = 20
RETRY_WINDOW = timedelta(minutes=5)
# Ready reasons that mean "this machine exited and stays stopped until its spec changes".
# The API server refused the machine's pod (400 bad request, 403 admission or quota, 422 invalid).
POD_REFUSED = "PodRefused"
POD_REFUSED_STATUSES = (400, 403, 422)
# Ready reasons that end the machine's run under its current spec: nothing is retried until it changes.
EXIT_REASONS = ("Exited", "RestartLimitExceeded", POD_REFUSED)


def pod_refused_message(status: int, why: str) -> str:
    return (f"the API server refused the machine's pod ({status}): {why[:800]}; change the spec"
            " (or set spec.state stopped, then started) to try again")
# Final for the spec (as a failed create on Fly). HostUnavailable is not: a host becoming Ready (a
# cluster starting, an operator restarting) is seconds away, and the Machine is placed then.
PLACEMENT_FAILURES = ("InsufficientCapacity", "RegionClosed", "NoHostsInRegion",
                      "VolumeHostGone", "VolumeAttached", "VolumeMismatch", "InvalidSpec")


@dataclass(frozen=True)
class Exit:
    code: int
    oom_killed: bool
    reason: str


@dataclass(frozen=True)
class PodView:
    """What the controller keeps of a machine's pod (from the watch)."""

    name: str
    instance: str | None
    spec_digest: str | None
    secrets_digest: str | None
    phase: str
    deleting: bool
    ready: bool  # Ready, and its checks pass (the gate condition) when it has checks
    running: bool
    restart_count: int
    last_exit: Exit | None  # the latest termination: current state, else lastState
    waiting_reason: str | None
    unschedulable: str | None
    ip: str | None
    checks_failing: str | None = None  # why the checks gate is not passed (None: passed, or no checks)
    unpublished: bool = False  # the routed gate: its host agent has not published it yet
    routed: bool = False  # the routed gate passed


def _checks_failing(gates: set[str], conds: dict) -> str | None:
    """The readiness gate as the host agent wrote it.

    Read directly, not only through Ready: a kubelet folds the gate into Ready, but
    kwok hosts write Ready once and never recompute it."""
    if CHECKS_GATE not in gates:
        return None
    gate = conds.get(CHECKS_GATE)
    if gate is None:
        return "no check result from the host agent yet"
    if gate.get("status") == "True":
        return None
    return gate.get("message") or "its checks do not pass"


def _exit(terminated: dict | None) -> Exit | None:
    if not terminated:
        return None
    reason = terminated.get("reason") or ""
    return Exit(int(terminated.get("exitCode", 0)), reason == "OOMKilled", reason)


def pod_view(pod: dict) -> PodView:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    ann = meta.get("annotations") or {}
    cs = next((c for c in status.get("containerStatuses") or [] if c.get("name") == "machine"), {})
    state = cs.get("state") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    sched = conds.get("PodScheduled") or {}
    gates = readiness_gates(pod)
    failing = _checks_failing(gates, conds)
    unpublished = ROUTED_GATE in gates and (conds.get(ROUTED_GATE) or {}).get("status") != "True"
    return PodView(
        name=meta.get("name", ""),
        instance=ann.get(labels.INSTANCE_ID),
        spec_digest=ann.get(SPEC_DIGEST),
        secrets_digest=ann.get(SECRETS_DIGEST),
        phase=status.get("phase") or "Pending",
        deleting=bool(meta.get("deletionTimestamp")),
        ready=(conds.get("Ready") or {}).get("status") == "True" and failing is None and not unpublished,
        running="running" in state,
        restart_count=int(cs.get("restartCount") or 0),
        last_exit=_exit(state.get("terminated")) or _exit((cs.get("lastState") or {}).get("terminated")),
        waiting_reason=(state.get("waiting") or {}).get("reason"),
        unschedulable=sched.get("message") if sched.get("status") == "False" else None,
        ip=status.get("podIP"),
        checks_failing=failing,
        unpublished=unpublished,
        routed=ROUTED_GATE in gates and not unpublished,
    )


@dataclass(frozen=True)
class VolumeView:
    name: str
    app: str
    region: str
    host: str | None
    claim: str | None
    attached: str | None
    resource_version: str
    migration_phase: str | None = None  # status.migration.phase (kubefly.volumes.migration)
    migration_target: str | None = None
    migrate_from: str | None = None  # labels.MIGRATE_FROM: a migration asked for


@dataclass(frozen=True)
class HostHealth:
    """The machine's host as the Node says, and as the host agents' gossip says.

    None in World.host means the Node is gone."""

    name: str
    ready: bool  # the Node's Ready condition: what the API server last heard from the kubelet
    since: str | None  # lastTransitionTime of the Ready condition
    agents: str | None = None  # its agent in gossip: alive, suspect or dead; None: no gossip view of it


@dataclass(frozen=True)
class HostVerdict:
    status: str  # of the HostReady condition: True, False or Unknown
    reason: str
    message: str
    event: str | None  # the Event type on entering this reason (None: none)
    log: str | None  # the status.events entry on entering it


def host_verdict(host: str, h: HostHealth | None, stays: str) -> HostVerdict:
    """Which side lost sight of the host: the API server (its Node), its peers (gossip), or both.

    Only when both have (or there is no gossip view) is it host loss, with the remedy `stays`.
    The API side alone is a control-plane or kubelet hiccup: the host runs, nothing to do."""
    if h is None:
        return HostVerdict("False", "HostGone", f"host {host} was removed from the cluster; {stays}", "Warning", "gone")
    since = h.since or "unknown"
    if not h.ready:
        if h.agents == "alive":
            return HostVerdict(
                "Unknown", "HostUnreportedByAPI",
                f"the API server has had no report from host {host} since {since} (its Node is NotReady), but "
                f"its agent is alive in gossip: the host is up, and the machine keeps running and serving; "
                f"nothing to do, this clears when the host reports to the API server again",
                "Normal", "unreported")
        agents = f"its agent is {h.agents} in gossip" if h.agents else "no gossip view of it"
        return HostVerdict(
            "False", "HostNotReady",
            f"host {host} is NotReady since {since} and {agents}; the machine comes back when the host does; {stays}",
            "Warning", "not_ready")
    if h.agents == "dead":
        return HostVerdict(
            "False", "HostUnreachableByAgents",
            f"host {host} is Ready for the API server, but its peers lost its agent in gossip: the proxy and "
            f".internal DNS may not reach this machine until the agent is back; the machine keeps running",
            "Warning", "unreachable_by_agents")
    return HostVerdict("True", "HostReady", f"host {host} is Ready", None, None)


@dataclass(frozen=True)
class World:
    machine: dict
    accepted: bool
    accepted_message: str
    now: datetime
    pod: PodView | None = None
    host: HostHealth | None = None
    volume: VolumeView | None = None
    secrets: list[SecretRef] | None = None  # None: some are missing (secrets_missing says which)
    secrets_missing: str = ""
    decision: Decision | None = None  # placement, when the machine has no host yet
    platform: PlatformSettings = field(default_factory=PlatformSettings)
    agents: bool = False  # host agents run: a pod is Ready once its host's agent published it (the routed gate)


@dataclass
class Plan:
    status: dict
    create_pod: dict | None = None
    delete_pod_grace: int | None = None  # delete the pod with this grace period
    pod_conditions: list[dict] = field(default_factory=list)  # to write into the pod's status
    attach_volume: VolumeView | None = None  # claim this volume before anything else
    migrate_volume: tuple[str, str | None] | None = None  # (volume, host): ask the Volume to move off that host; None: withdraw
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)
    placement: Decision | None = None  # a placement made now (for the create metrics)


def _ts(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def requested_by(meta: dict) -> str | None:
    """The field manager of the latest spec change (the API does not record the user on the object)."""
    spec_writes = [m for m in meta.get("managedFields") or [] if "f:spec" in (m.get("fieldsV1") or {})]
    if not spec_writes:
        return None
    return max(spec_writes, key=lambda m: m.get("time") or "").get("manager")


class _Builder:
    """Accumulates the new status, machine events and Kubernetes Events of one reconcile."""

    def __init__(self, w: World):
        self.w = w
        self.meta = w.machine["metadata"]
        self.spec = w.machine.get("spec") or {}
        old = w.machine.get("status") or {}
        self.old = old
        self.gen = self.meta.get("generation")
        self.st = {k: old[k] for k in OWNED_STATUS if k in old}
        self.st["observedGeneration"] = self.gen
        self.plan = Plan(status=self.st)
        self.moved_from: str | None = None  # the host this round moved the machine off (a drain)

    def cond(self, type_: str, ok: bool, reason: str, message: str) -> None:
        self.st["conditions"] = set_condition(self.st.get("conditions"), type_, ok, reason, message, self.gen, _ts(self.w.now))

    def state(self, new: str) -> None:
        self.st["state"] = new

    def log(self, type_: str, status: str, source: str = "kubefly", message: str | None = None, **extra) -> None:
        entry = {"type": type_, "status": status, "source": source, "timestamp": _ts(self.w.now)}
        if message:
            entry["message"] = message[:1024]
        if source == "user" and (who := requested_by(self.meta)):
            entry["requestedBy"] = who
        entry.update({k: v for k, v in extra.items() if v is not None})
        self.st["events"] = ([*(self.st.get("events") or []), entry])[-MAX_EVENTS:]

    def event(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append((type_, reason, message))


OWNED_STATUS = ("state", "host", "region", "instanceId", "version", "address", "restartCount", "conditions", "events",
          "specDigest", "rolledSecretsDigest", "retryWindowStart", "retryWindowBase")


def reconcile(w: World) -> Plan:
    b = _Builder(w)
    st, spec, name = b.st, b.spec, b.meta["name"]
    if not w.accepted:
        b.cond("Accepted", False, "InvalidSpec", w.accepted_message)
        if not st.get("host"):
            b.state("failed")
            b.cond("Ready", False, "InvalidSpec", f"not created: {w.accepted_message}")
        return b.plan
    b.cond("Accepted", True, "SpecValid", "spec is valid")

    if _migrate(b) or _move(b):
        return b.plan
    if not st.get("host"):
        if not _place(b):
            return b.plan
    if spec.get("mounts") and w.volume and w.volume.attached != name and b.plan.attach_volume is None:
        if w.volume.attached:
            # Someone else took the volume while we held the host: refuse, never share a volume.
            return _fail_volume(b, "VolumeAttached", f"spec.mounts[0].volume: volume {w.volume.name} is attached to machine {w.volume.attached}")
        b.plan.attach_volume = w.volume

    _host_health(b)
    _lifecycle(b)
    _stopped(b)
    return b.plan


def _stopped(b: _Builder) -> None:
    """`Stopped`: nothing runs. One condition to wait on for a machine applied stopped, whose state is
    `created` if it never ran (as on Fly) and `stopped` once it has."""
    state = b.st.get("state")
    if state == "created":
        b.cond("Stopped", True, "NeverStarted", "created and never started: nothing runs")
    elif state == "stopped":
        b.cond("Stopped", True, "Stopped", "stopped: nothing runs")
    else:
        b.cond("Stopped", False, str(state).capitalize(), f"the machine is {state}")


def moving_off(machine: dict) -> str | None:
    """The host a drain asked this Machine to leave, while it is still placed there (labels.MOVE_FROM).

    Only a Machine without a volume moves this way: its volume's data is on that host."""
    leave = (machine["metadata"].get("annotations") or {}).get(labels.MOVE_FROM)
    if leave and (machine.get("status") or {}).get("host") == leave and not (machine.get("spec") or {}).get("mounts"):
        return leave
    return None


def _migrate(b: _Builder) -> bool:
    """A Machine with a volume moves with it (kubefly.volumes.migration): asked off its host, it asks its
    Volume to migrate; it stops while the data is between hosts, and starts a new instance (same name,
    next version) where the Volume now is. True: nothing more this round."""
    w, st, spec = b.w, b.st, b.spec
    v, host = w.volume, st.get("host")
    if not spec.get("mounts") or v is None or v.attached != b.meta["name"] or not host:
        return False
    if v.migration_phase in MIGRATION_STOPS_MACHINE:
        if w.pod is not None and not w.pod.deleting:
            b.plan.delete_pod_grace = (spec.get("stop") or {}).get("timeoutSeconds", 5)
            b.log("migrate", "stopping", message=f"stopping on host {host} for the last copy of volume {v.name} "
                                                 f"to host {v.migration_target}")
            b.event("Normal", "Migrating", f"stopping on host {host} to start again on host {v.migration_target} "
                                           f"with volume {v.name}")
        if spec.get("state", "started") == "started":
            b.state("replacing")
        b.cond("Ready", False, "Migrating", f"moving with volume {v.name} to host {v.migration_target} "
                                            f"({str(v.migration_phase).lower()})")
        return True
    if v.host and v.host != host and v.migration_phase != "Aborting":
        st["host"] = v.host
        st.pop("address", None)
        st["version"] = int(st.get("version") or 0) + 1
        st["instanceId"] = instance_id(b.meta["uid"], st["version"])
        message = f"migrated from host {host} to host {v.host} with volume {v.name}"
        b.cond("Placed", True, "Migrated", f"on host {v.host} in region {st.get('region') or spec['region']}, "
                                           f"with volume {v.name}")
        b.log("migrate", "migrated", message=message)
        b.event("Normal", "Migrated", message)
        return False
    leave = (b.meta.get("annotations") or {}).get(labels.MOVE_FROM)
    if leave and leave == host == v.host and v.migrate_from != leave and v.migration_phase is None:
        b.plan.migrate_volume = (v.name, leave)
        b.log("migrate", "requested", message=f"moving off host {leave} with volume {v.name}")
    elif not leave and v.migrate_from == host and v.migration_phase in (None, "Copying"):
        # The machine's request was withdrawn (a drain that gave up, or a user) before the copy began.
        b.plan.migrate_volume = (v.name, None)
    return False


def _move(b: _Builder) -> bool:
    """Asked off its host: stop the machine there, then place it on another host of its region and
    start a new instance (same name, next version). True: nothing more this round."""
    w, st = b.w, b.st
    leave = moving_off(w.machine)
    if leave is None:
        return False
    region = st.get("region") or b.spec["region"]
    if w.pod is not None:
        if not w.pod.deleting:
            b.plan.delete_pod_grace = (b.spec.get("stop") or {}).get("timeoutSeconds", 5)
            b.log("move", "requested", message=f"leaving host {leave} (drain)")
            b.event("Normal", "Moving", f"stopping on host {leave} to start again on another host of region {region} (drain)")
        b.state("replacing")
        b.cond("Ready", False, "Moving", f"moving off host {leave} (drain): stopping the machine there")
        return True
    decision = w.decision
    if decision is None or not decision.ok:
        why = decision.message if decision else "waiting for a placement"
        b.cond("Ready", False, "MoveBlocked", f"cannot move off host {leave} (drain): {why}")
        if decision is not None and (get_condition(b.old.get("conditions"), "Ready") or {}).get("reason") != "MoveBlocked":
            b.event("Warning", "MoveBlocked", f"cannot move off host {leave}: {why}")
        return True
    st.pop("host", None)
    st.pop("address", None)
    st["version"] = int(st.get("version") or 0) + 1
    st["instanceId"] = instance_id(b.meta["uid"], st["version"])
    b.moved_from = leave
    return False


def _fail_volume(b: _Builder, reason: str, message: str) -> Plan:
    b.state("failed")
    b.cond("Placed", False, reason, message)
    b.cond("Ready", False, reason, message)
    if (get_condition(b.old.get("conditions"), "Placed") or {}).get("reason") != reason:
        b.event("Warning", reason, message)
        b.log("launch", "failed", message=message)
    return b.plan


def _place(b: _Builder) -> bool:
    """Choose the host (once, for the machine's life). False: nothing more to do this round."""
    w, st, spec, name = b.w, b.st, b.spec, b.meta["name"]
    placed = get_condition(b.old.get("conditions"), "Placed")
    if (
        b.old.get("state") == "failed"
        and placed
        and placed.get("reason") in PLACEMENT_FAILURES
        and placed.get("observedGeneration") == b.gen
    ):
        return False  # a failed create is final for this spec; a changed spec tries again
    mounts = spec.get("mounts") or []
    if mounts:
        vol_name, v = mounts[0]["volume"], w.volume
        if v is None or not v.host or not v.claim:
            why = "does not exist" if v is None else "is not placed on a host yet"
            b.state("created")
            b.cond("Placed", False, "WaitingForVolume", f"spec.mounts[0].volume: volume {vol_name} {why}")
            b.cond("Ready", False, "WaitingForVolume", f"waiting for volume {vol_name}")
            return False
        if v.app != spec["app"] or v.region != spec["region"]:
            _fail_volume(
                b, "VolumeMismatch",
                f"spec.mounts[0].volume: volume {vol_name} belongs to app {v.app} in region {v.region}, "
                f"not app {spec['app']} in region {spec['region']}",
            )
            return False
        if v.attached and v.attached != name:
            _fail_volume(b, "VolumeAttached", f"spec.mounts[0].volume: volume {vol_name} is attached to machine {v.attached}")
            return False
        b.plan.attach_volume = v if v.attached != name else None
    decision = w.decision
    if decision is None:
        return False
    b.plan.placement = decision
    if not decision.ok:
        b.state("failed")
        b.cond("Placed", False, decision.reason, decision.message)
        b.cond("Ready", False, decision.reason, f"not created: {decision.message}")
        b.event("Warning", decision.reason, decision.message)
        b.log("launch", "failed", message=decision.message)
        b.plan.attach_volume = None
        return False
    st["host"], st["region"] = decision.host, spec["region"]
    b.cond("Placed", True, "Placed", decision.message)
    if b.moved_from:
        moved = f"moved from host {b.moved_from} to host {decision.host} (drain)"
        b.event("Normal", "Moved", moved)
        b.log("move", "moved", message=moved)
        return True
    b.state("created")
    b.event("Normal", "Placed", decision.message)
    b.log("launch", "placed", source="user", message=decision.message)
    return True


def _host_health(b: _Builder) -> None:
    w, host, spec = b.w, b.st["host"], b.spec
    mounts = spec.get("mounts") or []
    stays = (
        f"its volume {mounts[0]['volume']} is on that host, so the machine is not moved: it runs again, with "
        f"its data, when the host is back. To run elsewhere now, from the volume's newest stored snapshot: "
        f"create a Volume with spec.forkFrom: {mounts[0]['volume']} (its status says how old the data is) "
        f"and a Machine that mounts it"
        if mounts
        else "the machine stays bound to it; to run elsewhere now, delete this Machine and create a new one"
    )
    old = get_condition(b.old.get("conditions"), "HostReady")
    v = host_verdict(host, w.host, stays)
    b.cond("HostReady", v.status, v.reason, v.message)
    entered = not old or old.get("reason") != v.reason
    if v.status == "True":
        if old and old.get("status") != "True":
            b.event("Normal", "HostRecovered", f"host {host} is Ready again")
    elif entered:
        b.event(v.event, v.reason, v.message)
        b.log("host", v.log, message=v.message)


def _held(b: _Builder, what: str) -> bool:
    """Platform maintenance holds every change to a started machine; say why and until when."""
    m = b.w.platform.maintenance
    if m is None:
        return False
    msg = f"{what} is held: {m.describe()}"
    old = get_condition(b.old.get("conditions"), "Held")
    b.cond("Held", True, "PlatformMaintenance", msg)
    if not old or old.get("status") != "True":
        b.event("Normal", "PlatformMaintenance", msg)
        b.log("update", "held", message=msg)
    return True


def _lifecycle(b: _Builder) -> None:
    w, st, spec, pod = b.w, b.st, b.spec, b.w.pod
    held_before = get_condition(b.old.get("conditions"), "Held")
    if w.platform.maintenance is None and held_before and held_before.get("status") == "True":
        b.cond("Held", False, "MaintenanceLifted", "platform maintenance is over; changes proceed")
        b.event("Normal", "MaintenanceLifted", "platform maintenance is over; held changes proceed")
    if pod and pod.ip:
        st["address"] = pod.ip
    stop_grace = (spec.get("stop") or {}).get("timeoutSeconds", 5)
    current = st.get("state")

    if spec.get("state", "started") == "stopped":
        b.cond("Ready", False, "Stopped", "desired state is stopped")
        if pod and not pod.deleting:
            if current == "started" and _held(b, "stopping the machine"):
                return
            b.plan.delete_pod_grace = stop_grace
            b.state("stopping")
            b.log("stop", "requested", source="user")
            b.event("Normal", "Stopping", f"stopping the machine (stop timeout {stop_grace}s)")
        elif pod:
            b.state("stopping")
        else:
            if current not in (None, "created", "stopped"):
                b.log("stop", "stopped")
                b.event("Normal", "Stopped", "the machine is stopped")
            b.state("created" if current in (None, "created") else "stopped")
        return

    ready = get_condition(b.old.get("conditions"), "Ready")
    if ready and ready.get("reason") in EXIT_REASONS and ready.get("observedGeneration") == b.gen:
        # It exited for good under this spec: stay stopped; clear away the dead pod.
        if pod and not pod.deleting:
            b.plan.delete_pod_grace = 0
        return

    if pod and pod.deleting:
        if current != "replacing":
            b.state("stopping")
        return

    if w.host is None or not w.host.ready:
        if w.host is None or w.host.agents != "alive":
            # (Only the API side lost sight of it: the machine's Ready stands as last seen.)
            b.cond("Ready", False, "HostNotReady", f"host {st['host']} is not Ready")
            if pod is not None and pod.routed:
                # The kubelet keeps the gate's last value: when the host is back, Ready would come
                # with its containers, before its (restarting) agent has published the machine.
                b.plan.pod_conditions.append(routed_condition(False, _ts(w.now)))
        if pod is None:
            return  # a pod pinned to a lost host could only hang in Pending

    if w.secrets is None:
        b.cond("SecretsReady", False, "WaitingForSecrets", w.secrets_missing)
        if pod is None:
            b.cond("Ready", False, "WaitingForSecrets", w.secrets_missing)
            return
    else:
        b.cond("SecretsReady", True, "SecretsReady", f"{len(w.secrets)} AppSecret(s) in the environment")

    digest = spec_digest(spec)
    if pod is None:
        _start(b, digest)
        return

    wanted_secrets = (b.meta.get("annotations") or {}).get(SECRETS_DIGEST)
    why = None
    if pod.instance != st.get("instanceId"):
        version = int(st.get("version") or 0)
        if st.get("instanceId") and pod_version(b.meta["uid"], pod.instance, version) is None:
            # A pod newer than the status we read: this view of the Machine is stale (our own write
            # not seen yet, or another writer's). Only a fresh read may decide; never delete on it.
            return
        if current == "replacing":
            # Our own replacement, its delete not seen yet: ask again, say nothing new.
            b.plan.delete_pod_grace = stop_grace
            return
        why = "the pod is of another version"
    elif pod.spec_digest != digest:
        why = "the spec changed"
    elif (
        wanted_secrets is not None
        and wanted_secrets != (pod.secrets_digest or "")
        and wanted_secrets != st.get("rolledSecretsDigest")
    ):
        why = "the app's secrets changed"
    if why:
        if current == "started" and _held(b, f"replacing the machine ({why})"):
            return
        if pod.instance == st.get("instanceId"):
            st["version"] = int(st.get("version") or 0) + 1
            st["instanceId"] = instance_id(b.meta["uid"], st["version"])
            st["specDigest"] = digest
        if wanted_secrets is not None:
            st["rolledSecretsDigest"] = wanted_secrets
        b.plan.delete_pod_grace = stop_grace
        b.state("replacing")
        b.cond("Ready", False, "Replacing", f"replacing the machine: {why}")
        b.log("update", "replacing", source="user" if why == "the spec changed" else "kubefly", message=why)
        b.event("Normal", "Replacing", f"replacing the machine on host {st['host']}: {why}")
        return
    _observe(b, pod)


def pod_version(uid: str, instance: str | None, upto: int) -> int | None:
    """The version (1..upto) a pod's instance id stands for; None: a newer one, or another Machine's."""
    return next((v for v in range(upto, 0, -1) if instance_id(uid, v) == instance), None)


def _start(b: _Builder, digest: str) -> None:
    w, st, spec = b.w, b.st, b.spec
    if st.get("specDigest") != digest or not st.get("instanceId"):
        st["version"] = int(st.get("version") or 0) + 1
        st["instanceId"] = instance_id(b.meta["uid"], st["version"])
        st["specDigest"] = digest
    claim = w.volume.claim if (spec.get("mounts") and w.volume) else None
    b.plan.create_pod = build_pod(
        b.w.machine, host=st["host"], region=st.get("region") or spec["region"], instance=st["instanceId"],
        secrets=w.secrets or [], claim=claim, routed_gate=w.agents,
    )
    st["restartCount"] = 0
    st.pop("retryWindowStart", None)
    st.pop("retryWindowBase", None)
    was = st.get("state")
    b.state("starting")
    b.cond("Ready", False, "Starting", f"starting version {st['version']} on host {st['host']}")
    if was != "replacing":
        b.log("start", "requested", source="user")
    starting = f"starting instance {st['instanceId']} (version {st['version']}) on host {st['host']}"
    if b.plan.events and b.plan.events[-1][1] == "Placed":
        # Placed and started in one pass: one Event, not two (a 1,000-machine burst is API-bound).
        b.plan.events[-1] = ("Normal", "Placed", f"{b.plan.events[-1][2]}; {starting}")
    else:
        b.event("Normal", "Starting", starting)


def _observe(b: _Builder, pod: PodView) -> None:
    """Turn the pod's phase and container status into the machine's state, events and restart decisions."""
    st, spec, now = b.st, b.spec, b.w.now
    restart = spec.get("restart") or {}
    policy, max_retries = restart.get("policy", "on-failure"), restart.get("maxRetries", 10)
    ex = pod.last_exit

    if pod.phase in ("Succeeded", "Failed"):
        code = ex.code if ex else (0 if pod.phase == "Succeeded" else 1)
        msg = f"the machine exited with code {code}" + (" (OOM killed)" if ex and ex.oom_killed else "")
        b.log("exit", "stopped", message=msg, exitCode=code, oomKilled=bool(ex and ex.oom_killed))
        b.event("Warning" if code else "Normal", "OOMKilled" if ex and ex.oom_killed else "Exited", f"{msg}; restart policy {policy}: it stays stopped")
        b.state("stopped")
        b.cond("Ready", False, "Exited", f"{msg}; restart policy {policy}: change the spec or set spec.state to stopped and back to started to start it again")
        b.plan.delete_pod_grace = 0
        return

    seen = int(st.get("restartCount") or 0)
    if pod.restart_count > seen:
        start = st.get("retryWindowStart")
        if not start or now - datetime.fromisoformat(start.replace("Z", "+00:00")) > RETRY_WINDOW:
            st["retryWindowStart"], st["retryWindowBase"] = _ts(now), seen
        retries = pod.restart_count - int(st.get("retryWindowBase") or 0)
        st["restartCount"] = pod.restart_count
        code = ex.code if ex else None
        oom = bool(ex and ex.oom_killed)
        if policy == "on-failure" and retries > max_retries:
            msg = (f"exited {retries} times within {int(RETRY_WINDOW.total_seconds() // 60)} minutes, more than "
                   f"restart.maxRetries={max_retries}; last exit code {code}{' (OOM killed)' if oom else ''}")
            b.log("exit", "stopped", message=msg, exitCode=code, oomKilled=oom)
            b.event("Warning", "RestartLimitExceeded", msg)
            b.state("stopped")
            b.cond("Ready", False, "RestartLimitExceeded", f"{msg}; it stays stopped: fix it and change the spec, or set spec.state to stopped and back to started")
            b.plan.delete_pod_grace = 0
            return
        msg = f"exited with code {code}{' (OOM killed)' if oom else ''}; restart {pod.restart_count} ({policy})"
        b.log("exit", "restarting", message=msg, exitCode=code, oomKilled=oom)
        b.event("Warning", "OOMKilled" if oom else "Exited", msg)

    if pod.running:
        if st.get("state") != "started":
            b.log("start", "started")
            b.event("Normal", "Started", f"instance {st.get('instanceId')} is started on host {st['host']}")
        b.state("started")
        if b.w.host is not None and b.w.host.ready:
            if pod.ready:
                b.cond("Ready", True, "Started", "started and its checks pass")
            elif pod.unpublished:
                b.cond("Ready", False, "Publishing", "started; its host's agent has not yet published it to "
                       "the proxies and .internal DNS (this takes under a second while the agent runs)")
            else:
                why = f": {pod.checks_failing}" if pod.checks_failing else ""
                b.cond("Ready", False, "ChecksFailing", f"started; its checks do not pass{why}; it gets no traffic "
                       "and is not restarted")
        return
    b.state("starting")
    if pod.unschedulable:
        b.cond("Ready", False, "Unschedulable", f"the host does not take the pod: {pod.unschedulable}")
    elif pod.waiting_reason:
        b.cond("Ready", False, pod.waiting_reason, f"the container is waiting: {pod.waiting_reason}")
