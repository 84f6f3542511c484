"""Failover, rejoin, switchover and fencing with real postgres + repmgr processes."""

import json
import time
import urllib.request

import psycopg
import pytest

from pg_component_helpers import wait_for

pytestmark = pytest.mark.component


def served_by(cluster) -> int:
    """The port of the postgres the endpoint forwards a new client to."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        return conn.execute("SELECT inet_server_port()").fetchone()[0]


def test_sigkill_primary_fails_over_without_losing_acknowledged_commits(make_cluster, writer_for):
    cluster = make_cluster(synchronous=True)
    old = cluster.wait_healthy(30)
    writer = writer_for(cluster)
    wait_for(lambda: len(writer.acked) > 50, 30, "writes before the kill")

    killed_at = time.monotonic()
    cluster.kill(old)
    wait_for(lambda: writer.acked_after(killed_at + 0.5), 60, "an acknowledged write after the kill")
    new = cluster.primary()
    assert new not in (None, old)
    assert served_by(cluster) == cluster.member(new).pg_port

    writer.stop.set()
    writer.join(10)
    acked = {n for n, _ in writer.acked}
    with psycopg.connect(cluster.member_dsn(new), autocommit=True) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM writes")}
    assert acked - stored == set(), "acknowledged commits missing on the new primary"

    cluster.start_member(old)
    assert cluster.wait_healthy(90) == new
    h = cluster.health(old)
    assert h["role"] == "standby" and h["timeline"] == cluster.health(new)["timeline"]


def test_switchover_moves_the_primary_and_the_endpoint(make_cluster, writer_for):
    cluster = make_cluster(synchronous=False)
    old = cluster.wait_healthy(30)
    target = next(m.name for m in cluster.members if m.name != old)
    writer = writer_for(cluster)
    wait_for(lambda: len(writer.acked) > 20, 30, "writes before the switchover")

    m = cluster.member(target)
    req = urllib.request.Request(f"http://{m.client_host}:{m.health_port}/switchover", method="POST", data=b"{}")
    with urllib.request.urlopen(req, timeout=180) as resp:
        assert json.load(resp) == {"primary": target, "old_primary": old}

    assert cluster.wait_healthy(90) == target
    assert cluster.health(old)["role"] == "standby"
    started = time.monotonic()
    wait_for(lambda: writer.acked_after(started), 30, "writes after the switchover")
    assert served_by(cluster) == m.pg_port


def test_partitioned_primary_is_fenced_and_never_writable_beside_the_new_one(make_cluster):
    cluster = make_cluster(netns=True)
    old = cluster.wait_healthy(30)

    cluster.partition(old)
    both_writable = []
    new = None
    deadline = time.monotonic() + 60
    # Watch every member until a new primary is up and the old one fenced, looking for two writables.
    while time.monotonic() < deadline:
        healths = cluster.healths()
        writable = sorted(n for n, h in healths.items() if h and h["writable"])
        if len(writable) > 1:
            both_writable.append(writable)
        old_h = healths[old]
        if writable and writable[0] != old and old_h and old_h["role"] == "fenced":
            new = writable[0]
            break
        time.sleep(0.1)
    assert both_writable == []
    assert new is not None, f"no failover with the old primary fenced: {cluster.healths()}"

    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cluster.member_dsn(old), autocommit=True, connect_timeout=3).execute("SELECT 1")
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE after_partition (x int)")
    assert served_by(cluster) == cluster.member(new).pg_port

    cluster.heal(old)
    assert cluster.wait_healthy(90) == new
    assert cluster.health(old)["role"] == "standby"
