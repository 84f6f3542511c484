"""Failover, rejoin, switchover and fencing with real postgres + repmgr processes."""

import threading
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
    code, answer = cluster.admin_post(target, "/switchover", token="wrong")
    assert code == 401, answer  # the admin endpoints take only the cluster's token
    assert cluster.admin_post(target, "/switchover", timeout=180) == (200, {"primary": target, "old_primary": old})

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


def test_failover_completes_when_repmgrd_elects_nobody(make_cluster):
    """The standbys' repmgrd die with the primary and come back to an unreachable upstream, so no
    election runs at all (as when repmgr cancels one on a sibling's stale sighting): the most
    advanced standby promotes itself once the old primary has long fenced, and the other follows."""
    cluster = make_cluster()
    old = cluster.wait_healthy(30)
    standbys = [m.name for m in cluster.members if m.name != old]
    for name in standbys:
        cluster.kill_repmgrd(name)
    cluster.kill(old)
    new = wait_for(cluster.primary, 60, "a primary after the kill")
    assert new in standbys
    with urllib.request.urlopen(f"http://{cluster.member(new).client_host}:{cluster.member(new).health_port}/metrics",
                                timeout=5) as resp:
        metrics = resp.read().decode()
    assert "kubefly_postgres_stalled_failover_promotions_total 1.0" in metrics
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE after_stall (x int)")
    other = next(n for n in standbys if n != new)
    wait_for(lambda: (cluster.health(other) or {}).get("upstream") is not None
             and cluster.health(other)["timeline"] == cluster.health(new)["timeline"], 60, "the other standby following")


# A client's commit or connect attempt taking longer than this is a hang (connects are capped at 5 s
# by the DSN's connect_timeout; a commit has no client-side cap, it waits as long as postgres does).
HANG_S = 10.0


@pytest.mark.parametrize(("handover", "new_pod_after_s"), [(True, 0.0), (False, 0.0), (False, 4.0)],
                         ids=["switchover", "no-switchover-back-at-once", "no-switchover-back-after-promotion"])
def test_graceful_stop_of_the_primary_refuses_writes_briefly_and_never_hangs(make_cluster, writer_for, handover,
                                                                               new_pod_after_s):
    """The kubelet's stop of the primary's pod (drain, eviction, `kubectl delete pod`): SIGTERM to the
    member, SIGKILL after the grace period; then a new pod of the same member on the same data,
    `new_pod_after_s` after the old one exited. With the hand-over a standby takes over before the
    member stops; without it (no time given for one) the standbys fail over, racing the new pod."""
    cluster = make_cluster(synchronous=True, handover_timeout_s=30.0 if handover else 0.0)
    old = cluster.wait_healthy(30)
    writer = writer_for(cluster)
    wait_for(lambda: len(writer.acked) > 50, 30, "writes before the stop")

    stopping = threading.Thread(target=cluster.terminate, args=(old, 60.0), daemon=True)
    stopped_at = time.monotonic()
    stopping.start()
    restarted, exited_at = False, None
    while not writer.acked_after(stopped_at + 0.5) or not restarted:
        assert writer.in_flight_s() < HANG_S, (
            f"a client attempt has hung for {writer.in_flight_s():.1f}s since {old} was stopped gracefully; "
            f"errors so far: {writer.errors[-5:]}; members: {cluster.healths()}")
        assert time.monotonic() - stopped_at < 90, f"no write within 90 s of stopping {old}: {cluster.healths()}"
        if exited_at is None and not stopping.is_alive():
            exited_at = time.monotonic()
            print(f"\n{old} exited {exited_at - stopped_at:.1f}s after SIGTERM")
        if not restarted and exited_at is not None and time.monotonic() - exited_at >= new_pod_after_s:
            cluster.start_member(old)  # the member's new pod, on the same volume
            restarted = True
        time.sleep(0.1)
    before = max(at for _, at in writer.acked if at <= stopped_at + 0.5)
    gap = min(at for _, at in writer.acked if at > stopped_at + 0.5) - before
    new = cluster.wait_healthy(90)
    print(f"write gap {gap:.1f}s, longest client attempt {writer.longest_attempt_s:.1f}s, primary now {new}"
          f" (was {old}); errors: {sorted({e for _, e in writer.errors})}")
    assert writer.longest_attempt_s < HANG_S
    if handover:
        assert new != old, "the primary handed over to a standby before it stopped"

    writer.stop.set()
    writer.join(10)
    acked = {n for n, _ in writer.acked}
    with psycopg.connect(cluster.member_dsn(new), autocommit=True) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM writes")}
    assert acked - stored == set(), "acknowledged commits missing after the graceful stop"
