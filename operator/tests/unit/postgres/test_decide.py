"""The pure decisions: which member the primary endpoint may use, when a primary fences, how a member boots."""

from hypothesis import given
from hypothesis import strategies as st

from kubefly.postgres import decide
from kubefly.postgres.decide import Report, View


def view(role="primary", writable=True, seen_at=100.0, timeline=1):
    return View(Report("x", role, writable=writable, timeline=timeline), seen_at)


def choose(views, now=100.0):
    return decide.choose_primary(views, now, fresh_s=1.0, fence_deadline_s=5.0)


def test_single_fresh_writable_primary_is_chosen():
    assert choose({"a": view(), "b": view("standby", False), "c": View()}) == "a"


def test_two_writable_primaries_choose_none():
    assert choose({"a": view(timeline=1), "b": view(timeline=2)}) is None


def test_silent_old_primary_blocks_new_one_until_its_fence_deadline():
    views = {"a": view(seen_at=100.0), "b": view(seen_at=103.0, timeline=2)}
    assert choose(views, now=103.0) is None  # a went quiet 3 s ago: it may still take writes
    assert choose(views, now=105.5) is None  # b is stale now too
    views["b"] = view(seen_at=105.5, timeline=2)
    assert choose(views, now=105.5) == "b"  # a silent longer than the deadline has fenced itself


def test_a_silent_old_primary_whose_health_port_refuses_is_gone_and_blocks_nobody():
    views = {"a": View(view().report, 100.0, refused_at=100.5), "b": view(seen_at=102.0, timeline=2)}
    assert choose(views, now=102.0) == "b"
    # A refusal older than the last report (it restarted since) proves nothing.
    views["a"] = View(view().report, 100.0, refused_at=99.0)
    assert choose(views, now=102.0) is None
    # Nor does it make a fresh writable report count less: two writable primaries choose none.
    views["a"] = View(view().report, 101.5, refused_at=99.0)
    assert choose(views, now=102.0) is None


def test_primary_that_reports_not_writable_does_not_block():
    views = {"a": view(writable=False), "b": view(timeline=2)}
    assert choose(views) == "b"


def test_a_primary_that_cannot_confirm_a_commit_gets_no_clients_and_blocks_the_others():
    # Synchronous with no standby streaming: a client's commit would never return.
    waiting = View(Report("a", "primary", writable=True, timeline=2, can_commit=False), 100.0)
    assert choose({"a": waiting, "b": view("standby", False)}) is None
    assert choose({"a": waiting, "b": view(timeline=1)}) is None  # still writable: never two
    assert choose({"a": view(timeline=2), "b": view("standby", False)}) == "a"  # once a standby streams


def test_a_report_without_can_commit_reads_it_from_writable():
    # A member of an older version says nothing about it: writable meant routable then.
    assert Report.from_json({"name": "a", "role": "primary", "writable": True}).can_commit
    assert not Report.from_json({"name": "a", "role": "primary", "writable": False}).can_commit
    assert not Report.from_json({"name": "a", "role": "primary", "writable": True, "can_commit": False}).can_commit


def test_nobody_writable_chooses_none():
    assert choose({"a": view("fenced", False), "b": view("standby", False)}) is None


reports = st.builds(
    lambda role, writable, can_commit, age, refused_after: View(
        Report("x", role, writable=writable, can_commit=writable and can_commit), 100.0 - age,
        None if refused_after is None else 100.0 - age + refused_after),
    st.sampled_from(["primary", "standby", "fenced", "starting"]),
    st.booleans(),
    st.booleans(),
    st.floats(min_value=0, max_value=20),
    st.none() | st.floats(min_value=-5, max_value=5),
)


@given(st.dictionaries(st.sampled_from("abcde"), reports, min_size=1))
def test_chosen_member_is_the_only_possibly_writable_one(views):
    chosen = choose(views)
    # Possibly writable: said so within the fence deadline and not refused since (a refusal means gone).
    possibly_writable = [n for n, v in views.items()
                         if v.report.writable and 100.0 - v.seen_at <= 5.0 and not v.gone]
    if chosen is not None:
        assert possibly_writable == [chosen]
        assert views[chosen].report.can_commit
        assert 100.0 - views[chosen].seen_at <= 1.0


def test_quorum_counts_self():
    assert decide.has_quorum(1, 3)
    assert not decide.has_quorum(0, 3)
    assert decide.has_quorum(2, 5) and not decide.has_quorum(1, 5)
    assert decide.has_quorum(0, 1)


def fence(**kw):
    args = dict(me="a", my_timeline=1, peers={}, total_members=3, quorum_lost_since=None, now=10.0, fence_after_s=3.0)
    args.update(kw)
    return decide.fence_reason(**args)


def test_primary_with_majority_keeps_running():
    assert fence(peers={"b": Report("b", "standby", timeline=1)}) is None


def test_primary_fences_after_losing_majority_for_the_deadline():
    assert fence(quorum_lost_since=8.0) is None
    assert "majority" in fence(quorum_lost_since=7.0)


def test_primary_fences_at_once_when_a_later_timeline_primary_is_visible():
    assert "later timeline" in fence(peers={"b": Report("b", "primary", timeline=2)})
    assert fence(peers={"b": Report("b", "primary", timeline=1)}, me="a") is None  # a < b: b steps down
    assert fence(peers={"a": Report("a", "primary", timeline=1)}, me="b") is not None


def test_single_member_never_fences_for_quorum():
    assert fence(total_members=1, quorum_lost_since=0.0) is None


def standby(name, lsn=100, node_id=None, **kw):
    return Report(name, "standby", lsn=lsn, node_id=node_id or ord(name) - ord("a") + 1,
                  visible_peers=kw.pop("visible_peers", frozenset({"b", "c"} - {name})), **kw)


def stalled(**kw):
    args = dict(me="b", my_lsn=100, my_node_id=2, peers={"c": standby("c")}, total_members=3,
                primary_seen_at=0.0, now=30.0, promote_after_s=20.0)
    args.update(kw)
    return decide.stalled_failover(**args)


def test_the_most_advanced_standby_promotes_when_repmgrd_promoted_nobody():
    assert "repmgrd promoted nobody" in stalled()  # equal LSN: the lower node id
    assert stalled(me="c", my_node_id=3, peers={"b": standby("b")}) is None
    assert stalled(my_lsn=99) is None
    assert stalled(my_lsn=None) is None
    assert "most advanced" in stalled(my_lsn=101, peers={"c": standby("c", lsn=100)})


def test_no_promotion_while_repmgrd_may_still_act():
    assert stalled(primary_seen_at=15.0) is None


def test_no_promotion_without_a_majority_or_alone():
    assert stalled(peers={}) is None
    assert stalled(total_members=1, peers={}) is None


def test_no_promotion_beside_any_primary_or_a_peer_mid_operation():
    assert stalled(peers={"c": Report("c", "primary", node_id=3)}) is None  # not writable still blocks
    assert stalled(peers={"c": standby("c", busy=True)}) is None


def test_no_promotion_when_a_peer_sees_a_member_hidden_from_us():
    # c still sees a (perhaps a primary holding a majority with c): a second primary would follow.
    assert stalled(peers={"c": standby("c", visible_peers=frozenset({"a", "b"}))}) is None


def test_members_not_yet_standbys_are_no_candidates():
    assert stalled(peers={"c": Report("c", "fenced", lsn=None, node_id=3, visible_peers=frozenset({"b"})),
                          "d": standby("d", lsn=500, visible_peers=frozenset({"b", "c"}))},
                   total_members=5) is None  # d is further ahead
    assert stalled(peers={"c": Report("c", "starting", node_id=1, visible_peers=frozenset({"b"}))}) is not None


def test_a_report_carries_what_a_peer_sees_and_whether_it_is_busy():
    rep = Report.from_json({"name": "c", "role": "standby", "visible_peers": ["a", "b"], "busy": True})
    assert rep.visible_peers == {"a", "b"} and rep.busy
    assert Report.from_json({"name": "c", "role": "standby"}).visible_peers == frozenset()


def boot(**kw):
    args = dict(me="b", has_data=True, was_primary=False, my_timeline=1, bootstrap=False, peers={}, total_members=3)
    args.update(kw)
    return decide.boot_action(**args)


def test_empty_member_clones_from_the_primary():
    a = boot(has_data=False, peers={"a": Report("a", "primary", timeline=1), "c": Report("c", "empty")})
    assert (a.kind, a.source) == ("clone", "a")


def test_bootstrap_only_when_every_peer_is_reachable_and_empty():
    empty = {"b": Report("b", "empty"), "c": Report("c", "empty")}
    assert boot(me="a", has_data=False, bootstrap=True, peers=empty).kind == "initdb"
    assert boot(me="a", has_data=False, bootstrap=True, peers={"b": Report("b", "empty")}).kind == "wait"
    assert boot(me="a", has_data=False, bootstrap=False, peers=empty).kind == "wait"
    stopped = {"b": Report("b", "starting"), "c": Report("c", "empty")}
    assert boot(me="a", has_data=False, bootstrap=True, peers=stopped).kind == "wait"


def test_old_primary_rejoins_the_newest_primary():
    peers = {"b": Report("b", "primary", timeline=2), "c": Report("c", "standby", timeline=2)}
    a = boot(me="a", was_primary=True, peers=peers)
    assert (a.kind, a.source) == ("rejoin", "b")


def test_old_primary_restarts_as_primary_only_with_a_majority_and_no_later_timeline():
    standbys = {"b": Report("b", "standby", timeline=1), "c": Report("c", "standby", timeline=1)}
    assert boot(me="a", was_primary=True, peers=standbys).kind == "start-primary"
    assert boot(me="a", was_primary=True, peers={}).kind == "wait"
    later = {"b": Report("b", "standby", timeline=2)}
    assert boot(me="a", was_primary=True, peers=later).kind == "wait"
    assert boot(me="a", was_primary=True, peers=standbys, primary_held=True).kind == "wait"


def test_standby_with_data_starts_as_standby():
    assert boot(peers={}).kind == "start-standby"
