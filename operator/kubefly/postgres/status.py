"""A PostgresCluster's status and its pods' role labels, from the members' /health reports.

Pure: the controller polls each member's health port and hands the answers
here. The primary is `decide.choose_primary`'s answer, the same rule the TCP
endpoint uses, so at most one pod is ever labelled primary, and none while a
silent former primary may still accept writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kubefly.postgres import decide

# A report counts as current this long (the operator polls every 2 s).
FRESH_S = 5.0
# A primary that went silent may still take writes until it fences (member's fence-after 3 s + checks).
FENCE_DEADLINE_S = 8.0


@dataclass(frozen=True)
class Observed:
    """One member as the operator sees it: its Machine and its latest /health answer."""

    name: str
    host: str | None = None
    started: bool = False
    view: decide.View = decide.View()
    lag_bytes: int | None = None
    error: str | None = None  # why the last poll got no answer
    terminating: bool = False  # its pod is being deleted (drain, eviction, kubectl delete)


@dataclass
class Judgement:
    primary: str | None
    roles: dict[str, str | None]  # member -> value of the pod's role label (None: no label)
    members: list[dict]  # status.members entries
    ready: int
    phase: str
    conditions: list[tuple[str, bool, str, str]] = field(default_factory=list)
    failover: dict | None = None  # a new status.lastFailover, when the primary changed
    timeline: int | None = None


def judge(
    observed: list[Observed],
    *,
    desired: int,
    now: float,
    now_rfc3339: str,
    previous_primary: str | None,
    switchover_to: str | None,
    initialized: bool,
) -> Judgement:
    views = {o.name: o.view for o in observed}
    primary = decide.choose_primary(views, now, fresh_s=FRESH_S, fence_deadline_s=FENCE_DEADLINE_S)
    roles: dict[str, str | None] = {}
    entries = []
    unreachable = []
    for o in observed:
        rep = o.view.report
        fresh = rep is not None and o.view.seen_at is not None and now - o.view.seen_at <= FRESH_S
        role = rep.role if fresh else "unknown"
        if role not in ("primary", "standby", "fenced", "starting", "empty"):
            role = "unknown"
        if o.terminating:
            # A pod being deleted takes no new clients, whatever it says: its address goes away
            # soon, and a connection to an address that is gone hangs instead of failing.
            roles[o.name] = None
        elif o.name == primary:
            roles[o.name] = "primary"
        elif fresh and role == decide.STANDBY:
            roles[o.name] = "standby"
        else:
            roles[o.name] = None  # a writable-but-not-chosen or silent member must not be behind a Service
        if not fresh:
            unreachable.append(f"{o.name} ({o.error or 'no answer yet'})")
        ready = fresh and (o.name == primary or role == decide.STANDBY)
        entry = {"name": o.name, "role": role, "host": o.host, "ready": ready}
        if fresh:
            entry["timeline"] = rep.timeline
            entry["lagBytes"] = o.lag_bytes
        entries.append(entry)
    ready_count = sum(1 for e in entries if e["ready"])
    conditions: list[tuple[str, bool, str, str]] = []
    started = sum(1 for o in observed if o.started)

    if primary is not None:
        conditions.append(("Initialized", True, "PrimaryElected", f"{primary} is the primary"))
    if len(observed) < desired or started < len(observed):
        phase = "Provisioning"
        reason, message = "MembersStarting", f"{started} of {desired} member machines started"
    elif unreachable:
        # After a first primary a missing member is a degradation; before, the cluster is still coming up.
        phase = "Degraded" if initialized or primary else "Provisioning"
        reason, message = "MemberHealthUnreachable", "member health unreachable: " + ", ".join(unreachable)
    elif primary is None:
        phase = "Degraded" if initialized else "Provisioning"
        reason, message = "NoPrimary", "no member is the one writable primary"
    elif ready_count < len(observed):
        phase = "Degraded"
        reason, message = "MembersNotReady", ", ".join(
            f"{e['name']} is {e['role']}" for e in entries if not e["ready"])
    else:
        phase = "Healthy"
        reason, message = "Healthy", f"{primary} is primary, {ready_count - 1} standby(s) streaming"
    conditions.append(("Ready", phase == "Healthy", reason, message))

    failover = None
    if primary is not None and previous_primary is not None and primary != previous_primary:
        leaving = next((o for o in observed if o.name == previous_primary and o.terminating), None)
        if switchover_to == primary:
            why = f"switchover to {primary} requested by spec.switchoverTo"
        elif leaving is not None:
            why = f"{previous_primary}'s pod was being deleted; {primary} took over"
        else:
            why = f"{previous_primary} stopped being the writable primary; repmgr promoted {primary}"
        failover = {"time": now_rfc3339, "reason": why, "from": previous_primary, "to": primary}
    timeline = next((e.get("timeline") for e in entries if e["name"] == primary), None)
    return Judgement(primary, roles, entries, ready_count, phase, conditions, failover, timeline)


@dataclass(frozen=True)
class Switchover:
    action: str  # none | done | refuse | attempt
    reason: str = ""
    message: str = ""


def switchover(
    target: str | None,
    *,
    members: list[str],
    primary: str | None,
    generation: int | None,
    condition: Mapping | None,
) -> Switchover:
    """What to do about spec.switchoverTo; a request is attempted once per generation."""
    if not target:
        return Switchover("none")
    if target not in members:
        return Switchover("refuse", "UnknownMember",
                          f"spec.switchoverTo names {target}, which is not a member (members: {', '.join(members)})")
    if target == primary:
        return Switchover("done", "Completed", f"{target} is the primary")
    if condition and condition.get("observedGeneration") == generation and condition.get("reason") == "Failed":
        return Switchover("none")  # tried and failed: the condition says why; a new request is a new generation
    if primary is None:
        return Switchover("refuse", "NoPrimary", f"no primary is known, so {target} cannot take over from one")
    return Switchover("attempt", "Requested", f"asking {target} to take over from {primary}")


# More complete WAL segments than this waiting on the primary: archiving falls behind.
ARCHIVE_LAG_SEGMENTS = 4


def archiving(problem: tuple[str, str] | None, primary: str | None,
              report: Mapping | None) -> tuple[str, bool, str, str]:
    """The ContinuousArchiving condition: `problem` (reason, message) is why the operator could not
    set archiving up; `report` is the primary's /health `archive`."""
    kind = "ContinuousArchiving"
    if problem is not None:
        return kind, False, *problem
    if primary is None:
        return kind, False, "NoPrimary", "no primary archives WAL now; the next primary carries on"
    if not report:
        return kind, False, "Starting", f"{primary} does not archive yet (members restart with archiving on)"
    path = report.get("path") or "?"
    if report.get("stanza") != "ready":
        if report.get("error"):
            return kind, False, "ArchiveFailing", str(report["error"])[:1000]
        return kind, False, "Starting", f"{primary} is creating the archive {path}"
    failed_age, archived_age = report.get("last_failed_age_s"), report.get("last_archived_age_s")
    pending = int(report.get("pending_segments") or 0)
    if failed_age is not None and (archived_age is None or failed_age < archived_age):
        return kind, False, "ArchiveFailing", (
            f"archive-push of {report.get('last_failed_wal')} to {path} failed and has not succeeded since; "
            f"{pending} segment(s) wait; the member's pgbackrest log says why")
    if pending > ARCHIVE_LAG_SEGMENTS:
        return kind, False, "ArchiveLagging", f"{pending} complete WAL segments on {primary} wait to be archived to {path}"
    last = report.get("last_archived_wal")
    return kind, True, "Archiving", (f"{primary} archives WAL to {path}"
                                     + (f"; last archived {last}" if last else "; no segment complete yet"))


def restored(refusal: tuple[str, str] | None, source: str | None, primary: str | None,
             reports: Mapping[str, Mapping]) -> tuple[str, bool, str, str]:
    """The Restored condition of a cluster with spec.restore. `source`: what it resolved to (described);
    `reports`: the members' /health `restore` (the bootstrap member's says how far it got)."""
    kind = "Restored"
    if refusal is not None:
        return kind, False, *refusal
    if primary is not None:
        # Only a member that finished restoring becomes a primary in a restored cluster.
        return kind, True, "Restored", f"restored from {source}; {primary} is the primary"
    for name, rep in sorted(reports.items()):
        if rep.get("state") == "failed":
            return kind, False, "RestoreFailed", f"{name}: restore from {rep.get('from')} failed, retried in a minute: "\
                                                 f"{rep.get('error')}"[:1000]
        if rep.get("state") in ("restoring", "recovering"):
            where = f", replayed to {rep['replay_lsn']}" if rep.get("replay_lsn") else ""
            return kind, False, "Restoring", f"{name} is {rep['state']} {rep.get('from')}{where}"
    return kind, False, "Restoring", f"waiting for the first member to restore {source}"
