"""Status and role labels from members' health reports (kubefly.postgres.status)."""

from __future__ import annotations

from kubefly.postgres import decide
from kubefly.postgres import status as S


def member(name, role=None, *, writable=False, seen=100.0, timeline=3, lag=0, started=True):
    view = decide.View(decide.Report(name, role, writable, timeline), seen) if role else decide.View()
    return S.Observed(name, host=f"h-{name}", started=started, view=view, lag_bytes=lag,
                      error=None if role else "connect timeout")


def run(observed, *, now=100.0, previous=None, switchover_to=None, initialized=False, desired=3):
    return S.judge(observed, desired=desired, now=now, now_rfc3339="2025-01-01T12:00:00Z",
                   previous_primary=previous, switchover_to=switchover_to, initialized=initialized)


def test_healthy_cluster_labels_one_primary_and_the_standbys():
    j = run([member("a", "primary", writable=True), member("b", "standby", lag=10), member("c", "standby")])
    assert j.primary == "a" and j.phase == "Healthy" and j.ready == 3 and j.timeline == 3
    assert j.roles == {"a": "primary", "b": "standby", "c": "standby"}
    assert j.members[1] == {"name": "b", "role": "standby", "host": "h-b", "ready": True, "timeline": 3, "lagBytes": 10}
    assert ("Ready", True, "Healthy", "a is primary, 2 standby(s) streaming") in j.conditions


def test_unreachable_members_are_unknown_and_the_phase_says_why():
    j = run([member("a"), member("b"), member("c")])
    assert j.primary is None and j.phase == "Provisioning"
    assert all(e["role"] == "unknown" and not e["ready"] and "lagBytes" not in e for e in j.members)
    assert set(j.roles.values()) == {None}
    ready = next(c for c in j.conditions if c[0] == "Ready")
    assert ready[1:3] == (False, "MemberHealthUnreachable")
    assert "member health unreachable: a (connect timeout)" in ready[3]
    assert run([member("a"), member("b"), member("c")], initialized=True).phase == "Degraded"


def test_machines_not_started_yet_is_provisioning():
    j = run([member("a", started=False), member("b")], desired=3)
    assert j.phase == "Provisioning" and "1 of 3 member machines started" in j.conditions[-1][3]


def test_a_member_whose_pod_is_being_deleted_loses_its_role_label_at_once():
    # Its address goes away with the pod; clients sent there meanwhile would hang, not fail.
    primary = member("a", "primary", writable=True)
    standby = member("b", "standby")
    j = run([S.Observed(**{**primary.__dict__, "terminating": True}), S.Observed(**{**standby.__dict__, "terminating": True}),
             member("c", "standby")])
    assert j.primary == "a"  # still the primary until it hands over or stops
    assert j.roles == {"a": None, "b": None, "c": "standby"}
    j = run([S.Observed(**{**member("a", "fenced").__dict__, "terminating": True}),
             member("b", "primary", writable=True), member("c", "standby")], previous="a")
    assert j.failover["reason"] == "a's pod was being deleted; b took over"


def test_two_writable_primaries_label_nobody_primary():
    j = run([member("a", "primary", writable=True), member("b", "primary", writable=True), member("c", "standby")],
            initialized=True)
    assert j.primary is None and j.roles["a"] is None and j.roles["b"] is None and j.phase == "Degraded"


def test_a_silent_former_primary_blocks_the_label_until_its_fence_deadline():
    old = member("a", "primary", writable=True, seen=100.0)
    new = member("b", "primary", writable=True, seen=106.0)
    assert run([old, new, member("c", "standby", seen=106.0)], now=106.0).primary is None
    j = run([old, new, member("c", "standby", seen=110.0)], now=110.0, previous="a")
    assert j.primary == "b" and j.roles["a"] is None
    assert j.failover == {"time": "2025-01-01T12:00:00Z", "from": "a", "to": "b",
                          "reason": "a stopped being the writable primary; repmgr promoted b"}


def test_a_requested_switchover_is_recorded_as_such():
    j = run([member("a", "standby"), member("b", "primary", writable=True), member("c", "standby")],
            previous="a", switchover_to="b")
    assert j.failover["reason"] == "switchover to b requested by spec.switchoverTo"


def test_switchover_decisions():
    members = ["pg-0", "pg-1", "pg-2"]
    assert S.switchover(None, members=members, primary="pg-0", generation=2, condition=None).action == "none"
    bad = S.switchover("pg-9", members=members, primary="pg-0", generation=2, condition=None)
    assert bad.action == "refuse" and bad.reason == "UnknownMember" and "pg-9" in bad.message
    assert S.switchover("pg-1", members=members, primary="pg-1", generation=2, condition=None).action == "done"
    assert S.switchover("pg-1", members=members, primary=None, generation=2, condition=None).reason == "NoPrimary"
    assert S.switchover("pg-1", members=members, primary="pg-0", generation=2, condition=None).action == "attempt"
    failed = {"reason": "Failed", "observedGeneration": 2}
    assert S.switchover("pg-1", members=members, primary="pg-0", generation=2, condition=failed).action == "none"
    assert S.switchover("pg-1", members=members, primary="pg-0", generation=3, condition=failed).action == "attempt"


def test_archiving_condition_tells_what_stops_archiving():
    ok = {"path": "/postgres/org/pg/7", "stanza": "ready", "last_archived_wal": "000000010000000000000003",
          "last_archived_age_s": 2.0, "last_failed_age_s": None, "pending_segments": 0}
    assert S.archiving(None, "pg-0", ok)[1:3] == (True, "Archiving")
    assert S.archiving(("NoObjectStore", "no store"), "pg-0", ok)[1:] == (False, "NoObjectStore", "no store")
    assert S.archiving(None, None, ok)[2] == "NoPrimary"
    assert S.archiving(None, "pg-0", None)[2] == "Starting"
    assert S.archiving(None, "pg-0", {**ok, "stanza": "pending"})[2] == "Starting"
    failed = S.archiving(None, "pg-0", {**ok, "stanza": "failed", "error": "stanza-create failed: exit 39"})
    assert failed[1:3] == (False, "ArchiveFailing") and "exit 39" in failed[3]
    # A failure after the last success is failing; one followed by a success is over.
    assert S.archiving(None, "pg-0", {**ok, "last_failed_wal": "X", "last_failed_age_s": 1.0})[2] == "ArchiveFailing"
    assert S.archiving(None, "pg-0", {**ok, "last_failed_age_s": 9.0})[1] is True
    assert S.archiving(None, "pg-0", {**ok, "pending_segments": S.ARCHIVE_LAG_SEGMENTS + 1})[2] == "ArchiveLagging"
    assert "no segment complete yet" in S.archiving(None, "pg-0", {**ok, "last_archived_wal": None,
                                                                     "last_archived_age_s": None})[3]
