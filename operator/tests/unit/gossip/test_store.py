from __future__ import annotations

import time

import pytest

from kubefly.gossip import hlc, wire
from kubefly.gossip.store import Store, newer, validate

KEYS = wire.Keys.from_secret(b"a-cluster-key-of-enough-length")
TTL = 60.0


def row(host="h1", mid="m1", **over):
    r = {"org": "acme", "app": "web", "machine_id": mid, "instance_id": "i1", "region": "r0", "host": host,
         "address": "10.0.0.1", "state": "started", "check_status": "passing", "load": 0, "services": []}
    r.update(over)
    return r


def rec(origin="h1", at=None, mid="m1", r="default"):
    at = time.time() if at is None else at
    return wire.sign_record(KEYS, origin, hlc.pack(int(at * 1000)), ("acme", mid), row(origin, mid) if r == "default" else r)


def test_lww_higher_hlc_wins_equal_is_same_write():
    old, new = rec(at=100), rec(at=200)
    assert newer(new, old) and not newer(old, new) and not newer(old, old) and newer(old, None)


def test_validate_accepts_a_good_row_and_tombstones():
    assert validate(rec(), time.time(), TTL).host == "h1"
    assert validate(rec(r=None), time.time(), TTL) is None


@pytest.mark.parametrize("r,reason", [
    (row(host="h2"), "wrong_origin"),
    (row(state="exploded"), "invalid_row"),
    (row(load=-1), "invalid_row"),
    (row(services=[{"internal_port": 70000}]), "invalid_row"),
    (row(mid="other"), "invalid_row"),
])
def test_validate_refuses(r, reason):
    bad = wire.sign_record(KEYS, "h1", hlc.pack(int(time.time() * 1000)), ("acme", "m1"), r)
    with pytest.raises(wire.WireError) as e:
        validate(bad, time.time(), TTL)
    assert e.value.reason == reason


def test_validate_refuses_expired_and_future_records():
    with pytest.raises(wire.WireError) as e:
        validate(rec(at=time.time() - TTL - 1), time.time(), TTL)
    assert e.value.reason == "expired"
    with pytest.raises(wire.WireError) as e:
        validate(rec(at=time.time() + 3600), time.time(), TTL)
    assert e.value.reason == "clock_drift"


def test_store_put_lww_digest_and_remove():
    s = Store(None, TTL)
    a1, a2 = rec(at=100), rec(at=200)
    assert s.put(a2) and not s.put(a1)
    assert s.get("h1", ("acme", "m1")) is a2 and s.live_count() == 1
    t = Store(None, TTL)
    t.put(a1)
    assert s.digest() != t.digest()
    t.put(a2)
    assert s.digest() == t.digest()
    u = Store(None, TTL)  # the digest does not depend on the order rows arrived in
    b = rec(at=150, mid="m2")
    s.put(b)
    u.put(b)
    u.put(a2)
    assert s.digest() == u.digest()
    tomb = rec(at=300, r=None)
    assert s.put(tomb) and s.live_count() == 1 and s.count() == 2
    s.remove("h1", ("acme", "m1"))
    s.remove("h1", ("acme", "m2"))
    assert s.count() == 0 and s.digest() == {}


def test_expiry_and_refresh():
    s = Store(None, TTL)
    now = time.time()
    s.put(rec("h1", at=now - TTL - 5, mid="old-live"))
    s.put(rec("h1", at=now - TTL - 5, mid="old-tomb", r=None))
    s.put(rec("h2", at=now - TTL - 5, mid="theirs"))
    s.put(rec("h1", at=now - TTL / 2, mid="stale"))
    s.put(rec("h1", at=now, mid="fresh"))
    expired = {r.key[1] for r in s.expired(now, keep_live_of="h1")}
    assert expired == {"old-tomb", "theirs"}  # our own live rows are refreshed, not expired
    assert {r.key[1] for r in s.needs_refresh("h1", now)} == {"old-live", "stale"}


def test_persistence_roundtrip(tmp_path):
    s = Store(tmp_path / "a.db", TTL)
    s.put(rec(mid="a"))
    s.put(rec(mid="b", r=None))
    s.meta_set("hlc", "123")
    s.close()
    t = Store(tmp_path / "a.db", TTL)
    loaded = t.load()
    assert {r.key[1] for r in loaded} == {"a", "b"}
    assert t.instance("h1", ("acme", "a")).machine_id == "a" and t.meta_get("hlc") == "123"
    t.remove("h1", ("acme", "a"))
    t.close()
    u = Store(tmp_path / "a.db", TTL)
    assert {r.key[1] for r in u.load()} == {"b"}
    # loaded records still carry their original signature
    assert wire.verify_record(KEYS, u.get("h1", ("acme", "b")).wire).row is None
