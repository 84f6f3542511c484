"""The leadership state machine: who may be active, decided from reads and their times only."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from kubefly.controllers.leadership import Election, Lease, Step, Timing

T = Timing(lease_duration=15, renew_deadline=10, retry_period=2)


def held(holder: str, rv: str, transitions: int = 0) -> Lease:
    return Lease(holder, 15, rv, transitions)


def test_timing_refuses_a_deadline_that_is_not_shorter_than_the_lease():
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        Timing(lease_duration=10, renew_deadline=10, retry_period=2)


def test_no_lease_is_created_and_a_released_one_taken_at_once():
    e = Election("a", T)
    assert e.next_step(None, 0) is Step.CREATE
    assert e.next_step(held("", "7"), 0) is Step.ACQUIRE


def test_a_candidate_takes_over_only_after_seeing_the_same_record_for_the_whole_duration():
    b = Election("b", T)
    assert b.next_step(held("a", "1"), 0) is Step.WAIT
    assert b.next_step(held("a", "1"), 14.9) is Step.WAIT
    assert b.next_step(held("a", "2"), 15) is Step.WAIT  # renewed: the count starts again
    assert b.next_step(held("a", "2"), 29.9) is Step.WAIT
    assert b.next_step(held("a", "2"), 30) is Step.ACQUIRE


def test_a_failed_read_starts_the_count_again():
    """After an API outage the holder may have renewed while we could not look: a queued write of its
    lands before we act, and the holder gets a full lease to show it is alive."""
    b = Election("b", T)
    assert b.next_step(held("a", "1"), 0) is Step.WAIT
    b.read_failed()  # the API paused for 90 s
    assert b.next_step(held("a", "1"), 90) is Step.WAIT
    assert b.next_step(held("a", "1"), 104) is Step.WAIT
    assert b.next_step(held("a", "1"), 105) is Step.ACQUIRE


def test_a_replica_takes_back_its_own_lease_at_once():
    """Its earlier process (a container restart, or its own exec after losing the lease) is gone."""
    assert Election("a", T).next_step(held("a", "5"), 0) is Step.ACQUIRE


def test_the_leader_renews_and_stops_at_the_deadline_counted_from_when_it_sent_the_renewal():
    a = Election("a", T)
    assert a.wrote(sent_at=100.0) is True
    assert a.next_step(held("a", "2"), 101) is Step.RENEW
    assert a.wrote(sent_at=102.0) is False
    assert not a.must_stop(111.9)
    assert a.must_stop(112.0)
    assert a.next_step(held("a", "3"), 112.0) is Step.STOP


def test_the_leader_stops_when_someone_else_holds_the_lease_or_it_is_gone():
    a = Election("a", T)
    a.wrote(0)
    assert a.next_step(held("b", "9"), 1) is Step.STOP
    assert a.next_step(None, 1) is Step.STOP


def test_a_leaders_request_never_outlives_its_deadline():
    a = Election("a", T)
    assert Election("x", T).request_timeout(0) == 2
    a.wrote(0)
    assert a.request_timeout(1) == 2
    assert a.request_timeout(9.5) == pytest.approx(0.5)
    assert a.request_timeout(20) == 0.2


def test_never_two_active_when_the_leader_is_cut_off():
    """Time steps of 0.1 s: the leader's renewals stop reaching the API at t=50 (a partition); the
    candidate keeps reading. At no instant are both active; the takeover comes within one lease
    duration plus a retry period of the last renewal."""
    a, b = Election("a", T), Election("b", T)
    rv, lease = 1, None
    a_active_until = None
    t, step_a, step_b = 0.0, 0.0, 0.0
    b_active_from = None
    while t < 120:
        if t >= step_a and not (a_active_until is not None and t >= a_active_until):
            step_a = t + T.retry_period
            if t < 50:
                s = a.next_step(lease, t)
                if s in (Step.CREATE, Step.ACQUIRE, Step.RENEW):
                    rv += 1
                    lease = Lease("a", 15, str(rv))
                    a.wrote(t)
            if a.must_stop(t):
                a_active_until = t
        if a.leading and a.must_stop(t) and a_active_until is None:
            a_active_until = t
        if t >= step_b and b_active_from is None:
            step_b = t + T.retry_period
            if b.next_step(lease, t) is Step.ACQUIRE:
                rv += 1
                lease = Lease("b", 15, str(rv))
                b.wrote(t)
                b_active_from = t
        if b_active_from is not None:
            assert a_active_until is not None and a_active_until <= b_active_from, f"two active at t={t:.1f}"
        t = round(t + 0.1, 1)
    assert a_active_until is not None and b_active_from is not None
    assert b_active_from - 48 <= 15 + T.retry_period + 0.2  # a's last renewal was at t=48


def test_the_lease_body_carries_the_resource_version_it_was_decided_on():
    e = Election("b", T)
    now = datetime(2026, 12, 2, 19, 0, 0, 123456, tzinfo=timezone.utc)
    body = e.lease_body(held("a", "41", transitions=3), "kubefly-system", "kubefly-operator", now)
    assert body["metadata"] == {"name": "kubefly-operator", "namespace": "kubefly-system", "resourceVersion": "41"}
    assert body["spec"] == {"holderIdentity": "b", "leaseDurationSeconds": 15, "renewTime": "2026-12-02T19:00:00.123456Z",
                            "acquireTime": "2026-12-02T19:00:00.123456Z", "leaseTransitions": 4}
    e.wrote(0)
    renewal = e.lease_body(Lease("b", 15, "42", 4, "2026-12-02T18:00:00.000000Z"), "kubefly-system", "kubefly-operator", now)
    assert renewal["spec"]["acquireTime"] == "2026-12-02T18:00:00.000000Z" and renewal["spec"]["leaseTransitions"] == 4
