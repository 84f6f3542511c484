from __future__ import annotations

from kubefly.gossip.agent import TokenBuckets
from kubefly.gossip.membership import ALIVE, DEAD, SUSPECT, Member, Membership, parse_update


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def make():
    clock = Clock()
    changes = []
    m = Membership(Member("me", "127.0.0.1", 1, "r0", inc=1), probe_interval=1.0, suspicion_mult=4,
                   clock=clock, on_change=lambda mem, old: changes.append((mem.host, old, mem.state)))
    return m, clock, changes


def test_join_suspect_dead_and_refutation_by_incarnation():
    m, clock, changes = make()
    assert m.apply(["b", "127.0.0.1", 2, "r1", 1, ALIVE])
    m.suspect("b")
    assert m.members["b"].state == SUSPECT and m.is_live("b")
    clock.t += m.suspicion_timeout() - 0.1
    m.tick()
    assert m.members["b"].state == SUSPECT
    clock.t += 0.2
    m.tick()
    assert m.members["b"].state == DEAD and not m.is_live("b")
    assert not m.apply(["b", "127.0.0.1", 2, "r1", 1, ALIVE])  # same incarnation cannot revive
    assert m.apply(["b", "127.0.0.1", 3, "r1", 2, ALIVE])  # a newer one can, with its new address
    assert m.members["b"].state == ALIVE and m.members["b"].port == 3
    assert [c[2] for c in changes] == [ALIVE, SUSPECT, DEAD, ALIVE]


def test_rumours_about_me_are_refuted():
    m, _, _ = make()
    assert m.apply(["me", "127.0.0.1", 1, "r0", 1, SUSPECT])
    assert m.me.inc == 2
    assert ["me", "127.0.0.1", 1, "r0", 2, ALIVE] in m.take_updates()
    assert not m.apply(["me", "127.0.0.1", 1, "r0", 1, DEAD])  # older than our incarnation


def test_unknown_dead_members_are_not_learned_and_unknown_origins_are_live():
    m, _, _ = make()
    assert not m.apply(["ghost", "127.0.0.1", 9, "r0", 5, DEAD])
    assert "ghost" not in m.members and m.is_live("ghost")


def test_updates_are_sent_a_bounded_number_of_times():
    m, _, _ = make()
    m.apply(["b", "127.0.0.1", 2, "r1", 1, ALIVE])
    sent = 0
    while m.take_updates():
        sent += 1
    assert sent == m.transmissions()


def test_probe_order_covers_every_live_member():
    m, _, _ = make()
    for i in range(5):
        m.apply([f"p{i}", "127.0.0.1", 10 + i, "r0", 1, ALIVE])
    m.members["p4"].state = DEAD
    assert {m.next_probe_target().host for _ in range(4)} == {"p0", "p1", "p2", "p3"}


def test_parse_update_rejects_junk():
    assert parse_update(["b", "1.2.3.4", 7946, "r", 0, ALIVE])
    for bad in (None, [], ["b", "ip", 0, "r", 0, ALIVE], ["b", "ip", 1, "r", -1, ALIVE], ["b", "ip", 1, "r", 0, "zombie"]):
        assert parse_update(bad) is None


def test_token_buckets():
    b = TokenBuckets(rate=10, burst=5)
    assert sum(b.allow("x", now=0.0) for _ in range(20)) == 5
    assert b.allow("y", now=0.0)  # per key
    assert sum(b.allow("x", now=1.0) for _ in range(20)) == 5  # refilled to the burst, not beyond
    assert b.take("z", 3, now=0.0) == 3 and b.take("z", 10, now=0.0) == 2 and b.take("z", 1, now=0.0) == 0
