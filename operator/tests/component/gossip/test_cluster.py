"""Twenty real `kubefly agent` processes on loopback, asserted through their local APIs."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import pytest_asyncio
from aiohttp import web

from kubefly.gossip import wire
from kubefly.gossip.client import ReplicaClient
from kubefly.gossip.harness import AgentCluster, free_port

pytestmark = [pytest.mark.component, pytest.mark.asyncio(loop_scope="module")]

N = 20
TTL = 6.0  # short tombstone TTL so "does not come back" is tested past expiry
ARGS = ("--tombstone-ttl", str(TTL), "--suspicion-mult", "2", "--sync-interval", "1")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster():
    c = AgentCluster(N, extra_args=ARGS)
    try:
        await c.start()
        yield c
    finally:
        await c.close()


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def all_agents_running(cluster):
    """Each test starts with every agent up, so one that fails mid-way (with its
    victim killed) cannot take the tests after it down with it."""
    down = [a for a in cluster.agents if not a.running]
    for a in down:
        await cluster.restart(a)
    if down:
        assert await members_alive(cluster, cluster.agents, N - 1, timeout=30)
    yield


async def member_state(c: AgentCluster, watcher, host: str, want: str, timeout: float) -> str:
    """Poll `watcher`'s view of `host` until it is `want`; return the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        doc = await c.get(watcher, "/v1/members")
        state = {m["host"]: m["state"] for m in doc["members"]}.get(host, "absent")
        if state == want or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


def has(key, **want):
    def pred(view):
        row = view.get(key)
        return row is not None and all(row.get(k) == v for k, v in want.items())
    return pred


def lacks(key):
    return lambda view: key not in view


async def members_alive(c: AgentCluster, agents, expected: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        docs = await asyncio.gather(*(c.get(a, "/v1/members") for a in agents))
        if all(sum(m["state"] == "alive" for m in d["members"]) >= expected for d in docs):
            return True
        await asyncio.sleep(0.3)
    return False


async def test_change_is_seen_everywhere(cluster):
    a = cluster.agents[3]
    cluster.write_machine(a, "everywhere", instance_id="v1")
    key = ("acme", "everywhere")
    assert await cluster.converge(cluster.agents, has(key, host=a.host, state="started", check_status="passing",
                                                      instance_id="v1", region=a.region))
    cluster.write_machine(a, "everywhere", instance_id="v2")
    assert await cluster.converge(cluster.agents, has(key, instance_id="v2"))
    doc = await cluster.get(cluster.agents[0], "/v1/instances?org=acme&app=web")
    assert doc["self"] == {"host": cluster.agents[0].host, "region": cluster.agents[0].region}
    assert [i["machine_id"] for i in doc["instances"]] == ["everywhere"]
    deadline = time.monotonic() + 10
    while len(doc["rtt"]) < N - 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        doc = await cluster.get(cluster.agents[0], "/v1/instances")
    assert len(doc["rtt"]) == N - 1 and all(v > 0 for v in doc["rtt"].values())
    assert await members_alive(cluster, cluster.agents, N - 1)


async def test_checks_decide_routability(cluster):
    healthy = {"ok": True}

    async def health(_req):
        return web.Response(status=200 if healthy["ok"] else 503)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        a = cluster.agents[11]
        check = {"name": "http", "type": "http", "port": port, "path": "/health", "interval_seconds": 1}
        cluster.write_machine(a, "checked", checks=[check])
        dead_port = free_port()
        cluster.write_machine(a, "tcp-down", checks=[{"name": "tcp", "type": "tcp", "port": dead_port,
                                                      "interval_seconds": 1}])
        assert await cluster.converge(cluster.agents, has(("acme", "checked"), check_status="passing"))
        assert await cluster.converge(cluster.agents, has(("acme", "tcp-down"), check_status="failing"))
        healthy["ok"] = False
        assert await cluster.converge(cluster.agents, has(("acme", "checked"), check_status="failing"))
    finally:
        await runner.cleanup()


async def test_load_reports_reach_everyone_and_only_for_own_rows(cluster):
    a, other = cluster.agents[6], cluster.agents[0]
    cluster.write_machine(a, "loaded")
    key = ("acme", "loaded")
    assert await cluster.converge([a], has(key))
    status, _ = await cluster.post(a, "/v1/load", {"loads": [{"org": "acme", "machine_id": "loaded", "load": 7}]})
    assert status == 200
    assert await cluster.converge(cluster.agents, has(key, load=7))
    status, body = await cluster.post(other, "/v1/load", {"loads": [{"org": "acme", "machine_id": "loaded", "load": 99}]})
    assert status == 422 and body["refused"] == [["acme", "loaded"]]
    await asyncio.sleep(1.5)
    assert (await cluster.instances(other))[key]["load"] == 7


async def test_machine_moving_hosts_never_loses_its_new_row(cluster):
    old, new = cluster.agents[18], cluster.agents[19]
    key = ("acme", "mover")
    cluster.write_machine(old, "mover", instance_id="before")
    assert await cluster.converge(cluster.agents, has(key, host=old.host))
    # The new host starts the replacement before the old host removes its pod:
    # the old host's later tombstone must not hide the new row (separate origin namespaces).
    cluster.write_machine(new, "mover", instance_id="after")
    assert await cluster.converge(cluster.agents, has(key, host=new.host, instance_id="after"))
    cluster.delete_machine(old, "mover")
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        views = await asyncio.gather(*(cluster.instances(a) for a in cluster.agents))
        assert all(has(key, host=new.host, instance_id="after")(v) for v in views)
        await asyncio.sleep(0.2)


async def test_deleted_instance_disappears_and_does_not_come_back(cluster):
    origin, lagger = cluster.agents[4], cluster.agents[7]
    key = ("acme", "doomed")
    cluster.write_machine(origin, "doomed")
    assert await cluster.converge(cluster.agents, has(key))
    await cluster.partition([lagger])  # the lagger keeps its live copy while the row is deleted
    try:
        cluster.delete_machine(origin, "doomed")
        rest = [x for x in cluster.agents if x is not lagger]
        assert await cluster.converge(rest, lacks(key))
        await asyncio.sleep(TTL + 1.5)  # past the tombstone's expiry everywhere
    finally:
        await cluster.heal()
    assert await members_alive(cluster, [lagger], N - 1)
    # Anti-entropy with the lagger has had time to run; the row must stay gone everywhere.
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        views = await asyncio.gather(*(cluster.instances(x) for x in cluster.agents))
        assert all(key not in v for v in views)
        await asyncio.sleep(0.5)


async def test_partition_and_heal(cluster):
    side = cluster.agents[12:16]
    rest = [a for a in cluster.agents if a not in side]
    key = ("acme", "split")
    await cluster.partition(side)
    try:
        cluster.write_machine(rest[0], "split")
        assert await cluster.converge(rest, has(key))
        views = await asyncio.gather(*(cluster.instances(a) for a in side))
        assert all(key not in v for v in views)
    finally:
        await cluster.heal()
    assert await cluster.converge(cluster.agents, has(key), timeout=20)
    assert await members_alive(cluster, cluster.agents, N - 1)


async def test_kill_and_restart(cluster):
    victim, watcher = cluster.agents[9], cluster.agents[0]
    key = ("acme", "victim-m")
    cluster.write_machine(victim, "victim-m")
    assert await cluster.converge(cluster.agents, has(key))
    cluster.kill(victim)
    alive = [a for a in cluster.agents if a is not victim]
    # A dead host's instances leave every view.
    assert await cluster.converge(alive, lacks(key), timeout=20)
    # Every member reaches the verdict itself: suspicion first, then death.
    assert await member_state(cluster, watcher, victim.host, "dead", timeout=20) == "dead"
    await cluster.restart(victim)
    # Its SQLite state is served at once, and it rejoins everywhere.
    assert (await cluster.instances(victim)).get(key) is not None
    assert await cluster.converge(cluster.agents, has(key), timeout=20)
    assert await members_alive(cluster, cluster.agents, N - 1)


async def test_replica_client_follows_and_survives_agent_restart(cluster):
    a = cluster.agents[8]
    client = ReplicaClient(a.api)
    await client.start()
    try:
        assert client.replica.self_host == a.host
        q = client.replica.subscribe()
        cluster.write_machine(cluster.agents[1], "followed")
        assert await client.replica.wait_for(lambda r: any(i.machine_id == "followed" for i in r.instances("acme", "web")), 10)
        change = await asyncio.wait_for(q.get(), 1)
        assert change.kind == "upsert" and change.instance.machine_id == "followed"
        assert ("acme", "web") in client.replica.apps()
        cluster.kill(a)
        await asyncio.sleep(0.5)
        assert any(i.machine_id == "followed" for i in client.replica.instances("acme", "web"))
        await cluster.restart(a)
        cluster.write_machine(cluster.agents[1], "followed-2")
        assert await client.replica.wait_for(lambda r: any(i.machine_id == "followed-2" for i in r.instances()), 20)
        assert client.connected
    finally:
        await client.close()


async def test_churning_agent_is_paced_below_receivers_limits(cluster):
    churner, bystander = cluster.agents[13], cluster.agents[17]
    limited = 'reason="rate_limited"'
    before = await cluster.metric(bystander, "kubefly_gossip_rejected_total", limited)
    client = ReplicaClient(bystander.api)
    await client.start()
    q = client.replica.subscribe(maxsize=100_000)
    final: dict[str, str] = {}
    backlog = 0.0
    try:
        t0 = time.monotonic()
        v = 0
        while time.monotonic() - t0 < 3:
            for i in range(100):
                v += 1
                cluster.write_machine(churner, f"churn-{i}", org="churn", instance_id=f"v{v}")
                final[f"churn-{i}"] = f"v{v}"
            backlog = max(backlog, await cluster.metric(churner, "kubefly_gossip_own_backlog"))
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0
        # Every agent ends on the last version of every row ...
        assert await cluster.converge(cluster.agents, lambda view: all(
            view.get(("churn", m), {}).get("instance_id") == iid for m, iid in final.items()), timeout=30)
        upserts = 0
        while not q.empty():
            ch = q.get_nowait()
            upserts += ch.kind == "upsert" and ch.instance.org == "churn"
    finally:
        await client.close()
    # ... while the churner held a backlog, pushed no faster than its pace (80/s, burst 400),
    # so receivers never had to refuse its rows, and nobody was suspected.
    assert backlog > 0
    assert upserts <= 80 * (elapsed + 30) + 400
    assert await cluster.metric(bystander, "kubefly_gossip_rejected_total", limited) == before
    assert await members_alive(cluster, cluster.agents, N - 1)


def _record_dgram(keys: wire.Keys, sender: str, records: list, port: int = 9) -> bytes:
    return wire.encode_dgram(keys, {"t": "g", "f": sender, "me": [port, "r0", 1], "r": records, "m": []})


def _row(host: str, mid: str, org: str = "forged", **over) -> dict:
    row = {"org": org, "app": "evil", "machine_id": mid, "instance_id": mid, "region": "r0", "host": host,
           "address": "127.0.0.9", "state": "started", "check_status": "passing", "load": 0,
           "services": [{"internal_port": 8080}]}
    row.update(over)
    return row


async def test_forged_and_malformed_messages_are_rejected(cluster):
    target = cluster.agents[1]
    keys = wire.Keys.from_secret(cluster.key)
    wrong = wire.Keys.from_secret(b"not-the-cluster-key-at-all")
    before = await cluster.instances(target)
    reasons = ("malformed", "bad_mac", "wrong_origin", "invalid_row", "own_origin")
    counts = {r: await cluster.metric(target, "kubefly_gossip_rejected_total", f'reason="{r}"') for r in reasons}
    victim_host = cluster.agents[5].host
    now = int(time.time() * 1000) << 16
    tampered = wire.sign_record(keys, victim_host, now, ("forged", "t"), _row(victim_host, "t"))
    tampered_wire = [tampered.body.replace("127.0.0.9", "127.0.0.8"), tampered.mac]
    dgrams = [
        b"\x00garbage",
        b"KF1" + b"\x00" * 16 + b"{}",
        _record_dgram(wrong, victim_host, [wire.sign_record(wrong, victim_host, now, ("forged", "a"),
                                                            _row(victim_host, "a")).wire]),
        # authentic, but an origin writing a row of another host
        _record_dgram(keys, victim_host, [wire.sign_record(keys, victim_host, now, ("forged", "b"),
                                                           _row(cluster.agents[6].host, "b")).wire]),
        # authentic, but not a valid row
        _record_dgram(keys, victim_host, [wire.sign_record(keys, victim_host, now, ("forged", "c"),
                                                           _row(victim_host, "c", services=[{"internal_port": 0}])).wire]),
        _record_dgram(keys, victim_host, [tampered_wire]),
        _record_dgram(keys, victim_host, [["not json", "x"], 42]),
        # a row for the target's own host, written by someone else
        _record_dgram(keys, victim_host, [wire.sign_record(keys, target.host, now, ("forged", "d"),
                                                           _row(target.host, "d")).wire]),
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in dgrams:
            s.sendto(d, ("127.0.0.1", target.gossip_port))
    await asyncio.sleep(1.5)
    after = {r: await cluster.metric(target, "kubefly_gossip_rejected_total", f'reason="{r}"') for r in reasons}
    for r in reasons:
        assert after[r] > counts[r], r
    assert await cluster.converge(cluster.agents, lambda v: not any(k[0] == "forged" for k in v), timeout=3)
    now_view = await cluster.instances(target)
    assert {k: v for k, v in now_view.items() if k in before} == {k: v for k, v in before.items() if k in now_view}
    assert set(before) <= set(now_view)


async def test_spamming_agent_is_rate_limited_and_others_stay_healthy(cluster):
    keys = wire.Keys.from_secret(cluster.key)
    rogue = "spammer"
    base = int(time.time() * 1000) << 16
    limited_before = sum([await cluster.metric(a, "kubefly_gossip_rejected_total", 'reason="rate_limited"')
                          for a in cluster.agents])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        seq = 0
        for burst in range(10):
            for a in cluster.agents:
                for _ in range(40):
                    recs = []
                    for _ in range(8):
                        seq += 1
                        recs.append(wire.sign_record(keys, rogue, base + seq, ("spam", f"s{seq % 5000}"),
                                                     _row(rogue, f"s{seq % 5000}", org="spam")).wire)
                    s.sendto(_record_dgram(keys, rogue, recs), ("127.0.0.1", a.gossip_port))
            await asyncio.sleep(0.05)
    key = ("acme", "during-spam")
    cluster.write_machine(cluster.agents[2], "during-spam")
    assert await cluster.converge(cluster.agents, has(key), timeout=15)
    limited = sum([await cluster.metric(a, "kubefly_gossip_rejected_total", 'reason="rate_limited"')
                   for a in cluster.agents])
    assert limited > limited_before
    # No real member was suspected or killed by the flood.
    docs = await asyncio.gather(*(cluster.get(a, "/v1/members") for a in cluster.agents))
    for d in docs:
        real = [m for m in d["members"] if m["host"] != rogue]
        assert len(real) == N - 1 and all(m["state"] == "alive" for m in real), d["self"]
