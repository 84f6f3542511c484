"""Pure decisions of the Postgres member and of whoever picks the primary endpoint.

No I/O here: the member (member.py), the TCP endpoint (endpoint.py) and later
the operator (labelling the primary pod) call these with what they observed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Roles a member reports on /health.
PRIMARY = "primary"
STANDBY = "standby"
FENCED = "fenced"  # was primary, stopped itself; waits to rejoin as a standby
STARTING = "starting"  # postgres not up yet (or being rejoined/cloned)
EMPTY = "empty"  # no data directory yet, waiting for a primary to clone from


@dataclass(frozen=True)
class Report:
    """The part of a member's /health that decisions use."""

    name: str
    role: str
    writable: bool = False
    timeline: int | None = None
    lsn: int | None = None
    node_id: int | None = None
    # Writable and a commit would return (synchronous: a standby streams that can confirm it).
    can_commit: bool = True
    visible_peers: frozenset[str] = frozenset()
    busy: bool = False  # in a switchover, demote, clone or rejoin: its role is about to change
    archive: Mapping[str, Any] | None = None  # WAL archiving as the member sees it (archiver.py); None: off
    restore: Mapping[str, Any] | None = None  # a restore from another cluster's archive, while or once it ran

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "Report":
        return cls(
            name=str(body["name"]),
            role=str(body["role"]),
            writable=bool(body.get("writable", False)),
            timeline=body.get("timeline"),
            lsn=body.get("lsn_bytes"),
            node_id=body.get("node_id"),
            can_commit=bool(body.get("can_commit", body.get("writable", False))),
            visible_peers=frozenset(str(n) for n in body.get("visible_peers") or ()),
            busy=bool(body.get("busy", False)),
            archive=body.get("archive") if isinstance(body.get("archive"), Mapping) else None,
            restore=body.get("restore") if isinstance(body.get("restore"), Mapping) else None,
        )


@dataclass(frozen=True)
class View:
    """An observer's latest successful report of a member and when it got it (monotonic seconds).

    `refused_at`: when a later poll found the member's health port closed
    (connection refused): the host answered and no member process listens, so
    its postgres is gone too (it dies with the member, PR_SET_PDEATHSIG).
    """

    report: Report | None = None
    seen_at: float | None = None
    refused_at: float | None = None

    @property
    def gone(self) -> bool:
        return self.refused_at is not None and (self.seen_at is None or self.refused_at > self.seen_at)


def majority(total_members: int) -> int:
    return total_members // 2 + 1


def has_quorum(visible_peers: int, total_members: int) -> bool:
    """Whether a member that sees `visible_peers` others (plus itself) sees a majority."""
    return visible_peers + 1 >= majority(total_members)


def choose_primary(views: Mapping[str, View], now: float, *, fresh_s: float, fence_deadline_s: float) -> str | None:
    """The one member the primary endpoint may send clients to, or None.

    A member counts as a writable primary while its last report said so and was
    heard within `fresh_s`. A member that said so and then went quiet may still
    be accepting writes from someone else until it fences itself, which it does
    within `fence_deadline_s` of losing the majority; until then it blocks every
    other candidate, unless its health port has refused a connection since (its
    process is gone, postgres with it: a dead primary writes nothing, so the
    failover does not wait out the deadline). A fresh writable primary that
    cannot confirm a commit (synchronous, no standby streaming) is not chosen
    and still blocks the others: clients are refused, not held on a commit
    that never returns. Two writable primaries at once, however short, give None:
    the endpoint never points at two writable primaries, and it refuses rather
    than guesses.
    """
    live: list[str] = []
    shadows = 0
    for name, view in views.items():
        if view.report is None or view.seen_at is None or not view.report.writable:
            continue
        age = now - view.seen_at
        if age <= fresh_s and not view.gone:
            # A writable primary that cannot confirm a commit yet is still the only one (it blocks
            # every other candidate) but gets no clients: they would hang on their first commit.
            if view.report.can_commit:
                live.append(name)
            else:
                shadows += 1
        elif age <= fence_deadline_s and not view.gone:
            shadows += 1
    if len(live) == 1 and shadows == 0:
        return live[0]
    return None


def newer_primary(me: str, my_timeline: int | None, peers: Mapping[str, Report]) -> str | None:
    """A visible peer that is a primary on a later timeline than ours (we are the stale one), if any.

    On the same timeline (never made by repmgr, only by a botched bootstrap) the
    lower name wins, so exactly one of the two steps down.
    """
    mine = my_timeline or 0
    for name, rep in sorted(peers.items()):
        if rep.role != PRIMARY or rep.timeline is None:
            continue
        if rep.timeline > mine or (rep.timeline == mine and name < me):
            return name
    return None


def fence_reason(
    *,
    me: str,
    my_timeline: int | None,
    peers: Mapping[str, Report],
    total_members: int,
    quorum_lost_since: float | None,
    now: float,
    fence_after_s: float,
) -> str | None:
    """Why a running primary must stop accepting writes now, or None.

    `peers` holds only the peers visible right now. A single-member cluster
    never fences (there is nobody to split from).
    """
    other = newer_primary(me, my_timeline, peers)
    if other is not None:
        return f"{other} is primary on a later timeline"
    if total_members > 1 and quorum_lost_since is not None and now - quorum_lost_since >= fence_after_s:
        return f"saw no majority of {total_members} members for {now - quorum_lost_since:.1f}s"
    return None


def stalled_failover(
    *,
    me: str,
    my_lsn: int | None,
    my_node_id: int,
    peers: Mapping[str, Report],
    total_members: int,
    primary_seen_at: float,
    now: float,
    promote_after_s: float,
) -> str | None:
    """Why this running standby must promote itself because repmgrd did not, or None.

    repmgrd's election can end with nobody promoted: with
    primary_visibility_consensus a candidate cancels when a sibling saw the
    primary a moment ago, and a cancelled election is never rerun (a standby
    whose repmgrd could not start has no election at all). So after
    `promote_after_s` without any primary in sight, the most advanced standby
    (highest LSN, then lowest node id) promotes, and only when that cannot make
    a second primary: it sees a majority, no visible peer sees a member it does
    not (a primary hidden from it but not from them), no peer is mid-operation,
    and any primary it lost has long fenced itself (it lost its majority too).
    `peers` holds only the peers visible right now.
    """
    if total_members < 2 or not has_quorum(len(peers), total_members):
        return None
    if now - primary_seen_at < promote_after_s:
        return None
    circle = set(peers) | {me}
    for rep in peers.values():
        if rep.role == PRIMARY or rep.busy or not rep.visible_peers <= circle:
            return None
    candidates = [(my_lsn if my_lsn is not None else -1, -my_node_id, me)]
    candidates += [(r.lsn if r.lsn is not None else -1, -(r.node_id or 0), n) for n, r in peers.items()
                   if r.role == STANDBY]
    if max(candidates)[2] != me:
        return None
    return f"no primary for {now - primary_seen_at:.0f}s and repmgrd promoted nobody; most advanced standby"


@dataclass(frozen=True)
class Action:
    kind: str  # initdb | clone | rejoin | start-primary | start-standby | wait
    source: str | None = None  # the peer to clone from / rejoin to
    why: str = ""


def boot_action(
    *,
    me: str,
    has_data: bool,
    was_primary: bool,
    my_timeline: int | None,
    bootstrap: bool,
    peers: Mapping[str, Report],
    total_members: int,
    primary_held: bool = False,
) -> Action:
    """What a member whose postgres is not running does next.

    `peers` holds the peers visible now; `primary_held` is set after a planned
    demotion, when this member must come back as a standby only.
    """
    primaries = sorted(
        (rep for rep in peers.values() if rep.role == PRIMARY),
        key=lambda r: (r.timeline or 0, r.lsn or 0),
        reverse=True,
    )
    primary = primaries[0] if primaries else None
    if not has_data:
        if primary is not None:
            return Action("clone", primary.name, "a primary is running")
        everyone_empty = len(peers) == total_members - 1 and all(r.role == EMPTY for r in peers.values())
        if bootstrap and everyone_empty:
            return Action("initdb", why="bootstrap member and every peer is empty")
        return Action("wait", why="no primary to clone from")
    if primary is not None:
        if was_primary:
            return Action("rejoin", primary.name, "another member is primary")
        return Action("start-standby", primary.name, "a primary is running")
    if not was_primary:
        return Action("start-standby", why="no primary visible yet; repmgrd elects one")
    if primary_held:
        return Action("wait", why="demoted: waiting for the new primary")
    if not has_quorum(len(peers), total_members):
        return Action("wait", why="former primary without a majority in sight")
    later = [r.name for r in peers.values() if (r.timeline or 0) > (my_timeline or 0)]
    if later:
        return Action("wait", why=f"{', '.join(sorted(later))} on a later timeline")
    return Action("start-primary", why="former primary, majority visible, no other primary")
