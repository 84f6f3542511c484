"""The proxy with real agents, real app processes and real HTTP on loopback.

Bounds are generous: timings belong to `make bench-proxy`; these assert behaviour.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HOP_TOKEN, KUBEFLY, ProxyProc
from kubefly.gossip.harness import free_port

pytestmark = pytest.mark.component


async def get(session, proxy, app, path="/", **headers):
    async with session.get(proxy.url + path, headers={"Host": f"{app}.{proxy.domain}", **headers}) as r:
        return r.status, dict(r.headers), await r.read()


@pytest.fixture(scope="module")
def apps(platform):
    """web: one instance per host. geo: a local (hard 2) and a remote instance. hot: two
    instances on host-000 with hard limit 1 each. spread: as hot plus one on host-001,
    routed with strategy leastload (the config names it)."""
    p = platform
    p.machine(0, "web-0", "web", p.backend("web-0"))
    p.machine(1, "web-1", "web", p.backend("web-1"))
    p.machine(0, "geo-0", "geo", p.backend("geo-0"), soft=1, hard=2)
    p.machine(1, "geo-1", "geo", p.backend("geo-1"), soft=1, hard=2)
    p.machine(0, "hot-a", "hot", p.backend("hot-a"), soft=1, hard=1)
    p.machine(0, "hot-b", "hot", p.backend("hot-b"), soft=1, hard=1)
    p.machine(0, "spread-a", "spread", p.backend("spread-a"), soft=1, hard=1)
    p.machine(0, "spread-b", "spread", p.backend("spread-b"), soft=1, hard=1)
    p.machine(1, "spread-c", "spread", p.backend("spread-c"), soft=1, hard=1)
    p.machine(0, "flood-0", "flood", p.backend("flood-0"))
    p.machine(0, "conn-a", "conn", p.backend("conn-a"), soft=1, hard=1, concurrency="connections")
    p.machine(0, "conn-b", "conn", p.backend("conn-b"), soft=1, hard=1, concurrency="connections")
    p.machine(0, "twin-a", "twin", p.backend("twin-a"), org="acme")
    p.machine(1, "twin-b", "twin", p.backend("twin-b"), org="globex")
    for app, machines in {"web": {"web-0", "web-1"}, "geo": {"geo-0", "geo-1"}, "hot": {"hot-a", "hot-b"},
                          "flood": {"flood-0"}, "conn": {"conn-a", "conn-b"},
                          "spread": {"spread-a", "spread-b", "spread-c"}}.items():
        p.wait_routable(app, machines)
    return p


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def test_routes_by_host_and_never_proxies_elsewhere(apps, session):
    p0 = apps.proxies[0]
    status, headers, body = await get(session, p0, "web")
    assert status == 200 and body == b"web-0\n"  # the instance in the proxy's own region
    assert headers["fly-request-id"].endswith("-r0")
    status, headers, body = await get(session, p0, "nope")
    assert status == 404 and headers["kubefly-error"] == "unknown-app" and b"no app nope" in body
    async with session.get(p0.url + "/", headers={"Host": "example.com"}) as r:
        assert r.status == 404
    # The absolute form names another site: still routed (or refused) by Host only.
    reader, writer = await asyncio.open_connection("127.0.0.1", p0.port)
    writer.write(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 404 ")


async def test_a_machine_with_only_private_services_is_not_served_at_the_edge(platform, session):
    """Like a PostgresCluster member: its service has no public port, so its app has no name at the edge."""
    p = platform
    p.machine(0, "vault-0", "vault", p.backend("vault-0"), public=False)
    p.machine(0, "ledger-0", "ledger", p.backend("ledger-0"), public=False)
    # Written after the private rows on the same agent: once routable, the private rows reached both proxies too.
    p.machine(0, "open-0", "open", p.backend("open-0"))
    p.wait_routable("open", {"open-0"})
    for proxy in p.proxies:
        for host in ("vault", "vault.acme"):
            status, headers, body = await get(session, proxy, host)
            assert status == 404 and headers["kubefly-error"] == "unknown-app", (proxy.host, host, status, body)
            assert b"vault-0" not in body
        status, _, body = await get(session, proxy, "ledger", **{"fly-force-instance-id": "ledger-0"})
        assert status == 404 and b"ledger-0" not in body
    # Its host's hop listener does not serve it either, to a caller that names the instance.
    p0 = p.proxies[0]
    async with session.get(f"http://{p0.hop_ip}:{p0.hop_port}/",
                           headers={"Host": "vault.test", "kubefly-instance": "acme/vault/vault-0",
                                    "kubefly-hop-token": HOP_TOKEN}) as r:
        assert r.status in (403, 503) and await r.read() != b"vault-0\n"
    # The same machine with a public http port routes: the 404 was the privacy rule, not a missing row.
    p.machine(0, "vault-0", "vault", p.backend("vault-0"))
    p.wait_routable("vault", {"vault-0"})
    status, _, body = await get(session, p.proxies[1], "vault")
    assert status == 200 and body == b"vault-0\n"


async def test_host_header_port_is_validated(apps):
    p0 = apps.proxies[0]

    async def status(host: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", p0.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        return answer.split(b"\r\n", 1)[0]

    web = f"web.acme.{p0.domain}".encode()
    assert await status(web + b":abc") == b"HTTP/1.1 400 Bad Request"
    assert await status(web + b":99999") == b"HTTP/1.1 400 Bad Request"
    assert await status(web + b":8080") == b"HTTP/1.1 200 OK"


async def test_same_app_name_in_two_orgs(apps, session):
    p0 = apps.proxies[0]
    apps.wait_routable("twin.acme", {"twin-a"})
    apps.wait_routable("twin.globex", {"twin-b"})
    assert (await get(session, p0, "twin.globex"))[2] == b"twin-b\n"
    status, _, body = await get(session, p0, "twin")
    assert status == 404 and b"twin.<org>." in body


async def test_local_first_then_cross_region_when_local_is_full(apps, session):
    p0 = apps.proxies[0]
    results = await asyncio.gather(*(get(session, p0, "geo", "/slow?ms=1500") for _ in range(4)))
    served = sorted(h["x-machine-id"] for s, h, _ in results)
    assert all(s == 200 for s, _, _ in results)
    # The local instance takes its hard limit (2); the rest crosses to r1 through host-001's proxy.
    assert served == ["geo-0", "geo-0", "geo-1", "geo-1"]
    # One at a time, everything stays local.
    for _ in range(5):
        assert (await get(session, p0, "geo"))[2] == b"geo-0\n"


async def test_leastload_app_fills_its_region_before_crossing(apps, session):
    p0 = apps.proxies[0]
    results = await asyncio.gather(*(get(session, p0, "spread", "/slow?ms=1500") for _ in range(3)))
    assert [s for s, _, _ in results] == [200] * 3
    # Each local instance takes its one request (hard limit 1); the third crosses to r1.
    assert sorted(h["x-machine-id"] for _, h, _ in results) == ["spread-a", "spread-b", "spread-c"]


async def test_host_answers_full_at_the_hard_limit(apps, session):
    p0, p1 = apps.proxies
    busy = asyncio.create_task(get(session, p0, "hot", "/slow?ms=2000", **{"fly-force-instance-id": "hot-a"}))
    await asyncio.sleep(0.5)

    async def hop(instance):
        """What an edge on another host sends to host-000's proxy."""
        async with session.get(f"http://127.0.0.1:{p0.hop_port}/",
                               headers={"Host": "hot.test", "kubefly-instance": instance, "kubefly-hop-token": HOP_TOKEN}) as r:
            return r.status, r.headers.get("kubefly-full")

    assert await hop("acme/hot/hot-a") == (503, "1")  # at its hard limit: "full" at once, no queue
    assert await hop("acme/hot/hot-b") == (200, None)
    assert await hop("acme/hot-b") == (200, None)  # an older edge's org/machine still works
    assert (await busy)[0] == 200
    # Seen from an edge on the other host: two served on distinct instances, the third
    # refused once its retry budget is spent, never queued behind a busy instance.
    results = await asyncio.gather(*(get(session, p1, "hot", "/slow?ms=2500") for _ in range(3)))
    served = sorted(h.get("x-machine-id", "") for s, h, _ in results if s == 200)
    assert served == ["hot-a", "hot-b"]
    assert sorted(s for s, _, _ in results) == [200, 200, 503]


class KeepAlive:
    """One client connection, kept open between requests (aiohttp's pool would hide that)."""

    def __init__(self, port: int, host: str):
        self.port, self.host = port, host
        self.reader = self.writer = None

    async def get(self, path: str = "/", **headers) -> tuple[int, dict, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{extra}\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 15)
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        body = await self.reader.readexactly(int(fields.get("content-length", 0)))
        return int(lines[0].split()[1]), fields, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
            self.writer = None


async def test_connections_type_counts_open_client_connections(apps):
    """conn: two instances on host-000, concurrency type connections, hard limit 1 each.
    An open keep-alive connection holds its slot between requests; its requests stay on
    that instance; a third connection is refused until one closes."""
    p0, p1 = apps.proxies
    for edge in (p1, p0):  # through a hop to host-000's proxy, then with the instances on the edge's host
        a, b, c = (KeepAlive(edge.port, "conn.test") for _ in range(3))
        try:
            first = [await a.get() for _ in range(3)]
            assert [s for s, _, _ in first] == [200] * 3
            held = {h["x-machine-id"] for _, h, _ in first}
            assert len(held) == 1  # one connection, one instance, one slot
            status, headers, _ = await b.get()
            assert status == 200 and headers["x-machine-id"] not in held  # a's idle connection still counts
            status, headers, _ = await c.get()
            assert status == 503 and headers["kubefly-error"] == "full"
            assert (await a.get())[0] == 200  # requests on a held connection need no new slot
            await a.close()  # frees a's slot (on host-000: the edge closes its own hop connection)
            await c.close()
            deadline = time.monotonic() + 10
            while True:
                c = KeepAlive(edge.port, "conn.test")
                status, headers, _ = await c.get()
                if status == 200:
                    break
                await c.close()
                assert time.monotonic() < deadline, "a closed connection's slot was not released"
                await asyncio.sleep(0.2)
            assert headers["x-machine-id"] in held
        finally:
            for k in (a, b, c):
                await k.close()


async def test_hop_address_comes_from_the_agents(apps, session):
    """No hop address is configured: host-001's proxy takes hops only on 127.0.0.2, the
    address host-001's agent advertises, which host-000's proxy learns from its own agent."""
    p0, p1 = apps.proxies
    assert "host_proxies" not in apps.config.read_text() and p1.hop_ip == "127.0.0.2"
    async with session.get(apps.agents[0].api + "/v1/members") as r:
        members = await r.json()
    assert {m["host"]: m["addr"].rsplit(":", 1)[0] for m in members["members"]} == {"host-001": "127.0.0.2"}
    status, headers, _ = await get(session, p0, "web", **{"fly-force-instance-id": "web-1"})
    assert status == 200 and headers["x-machine-id"] == "web-1"


async def test_full_answer_makes_the_edge_retry_another_instance(apps, session):
    p0 = apps.proxies[0]
    retries = p0.metric("kubefly_proxy_retries_total", app="web")
    status, headers, _ = await get(session, p0, "web", "/full?except=web-1")
    assert status == 200 and headers["x-machine-id"] == "web-1"  # web-0 (local) said full first
    assert p0.metric("kubefly_proxy_retries_total", app="web") > retries
    assert p0.metric("kubefly_proxy_full_total", app="web") >= 1
    status, headers, _ = await get(session, p0, "web", "/full")
    assert status == 503 and headers["kubefly-error"] == "full"  # every instance says full


async def test_forwarding_headers(apps, session):
    p0 = apps.proxies[0]
    status, headers, body = await get(
        session, p0, "web", "/headers",
        **{"Connection": "keep-alive, x-hop", "X-Hop": "1", "Fly-Client-IP": "6.6.6.6", "X-Forwarded-For": "10.9.9.9",
           "Proxy-Authorization": "secret", "X-App": "kept"},
    )
    seen = dict(json.loads(body))
    assert status == 200
    assert seen["fly-client-ip"] == "127.0.0.1" and seen["fly-region"] == "r0"
    assert seen["x-forwarded-for"] == "10.9.9.9, 127.0.0.1" and seen["x-forwarded-proto"] == "http"
    assert seen["forwarded"].startswith('for="127.0.0.1";proto=http')
    assert seen["fly-request-id"] == headers["fly-request-id"]
    assert seen["x-app"] == "kept"
    for gone in ("x-hop", "proxy-authorization", "connection", "kubefly-instance"):
        assert gone not in seen


async def test_a_hop_without_the_platform_token_is_refused_and_a_tokenless_host_trusts_no_forwarding_header(
        apps, session, tmp_path):
    """Anyone who reaches a host's hop port would skip the edge, its budgets and its header
    rewriting: a hop without the token, or with a wrong one, is refused; with it, the edge's
    forwarding headers are kept. A proxy run without a token (standalone) takes hops but drops
    every forwarding header, since nothing proves who sent them."""
    p0 = apps.proxies[0]
    forged = {"Host": "web.test", "kubefly-instance": "acme/web/web-0", "Fly-Client-IP": "6.6.6.6",
              "X-Forwarded-For": "6.6.6.6", "Forwarded": 'for="6.6.6.6"', "Fly-Region": "r9"}
    for token in (None, "", "not-the-token", HOP_TOKEN + "x", HOP_TOKEN[:-1]):
        headers = forged if token is None else {**forged, "kubefly-hop-token": token}
        async with session.get(f"http://{p0.hop_ip}:{p0.hop_port}/headers", headers=headers) as r:
            assert (r.status, r.headers.get("kubefly-error")) == (403, "hop-token"), token
            assert b"6.6.6.6" not in await r.read()
    async with session.get(f"http://{p0.hop_ip}:{p0.hop_port}/headers",
                           headers={**forged, "kubefly-hop-token": HOP_TOKEN}) as r:
        seen = dict(json.loads(await r.read()))
        assert r.status == 200 and seen["fly-client-ip"] == "6.6.6.6" and "kubefly-hop-token" not in seen

    # The agent takes load reports (which rank this host's instances everywhere) only from its proxy.
    a0 = apps.agents[0]
    body = {"loads": [{"org": "acme", "machine_id": "web-0", "load": 999}]}
    for auth in ({}, {"Authorization": "Bearer guessed"}):
        async with session.post(f"{a0.api}/v1/load", json=body, headers=auth) as r:
            assert r.status == 401, auth
    async with session.post(f"{a0.api}/v1/admin/partition", json={"drop": ["host-001"]}) as r:
        assert r.status == 404  # fault injection is not served unless the agent runs with --admin-api
    for proxy in apps.proxies:  # while the proxies' own reports, with the token, are taken
        assert not [ln for ln in proxy.log.read_text().splitlines() if "load report refused" in ln and "401" in ln]
    port, hop, met = free_port(), free_port(), free_port()
    argv = [KUBEFLY, "proxy", "--listen", f"127.0.0.1:{port}", "--hop-listen", f"{p0.hop_ip}:{hop}",
            "--metrics-listen", f"127.0.0.1:{met}", "--agent", a0.api, "--config", str(apps.config), "--starter", "none"]
    bare = ProxyProc(a0.host, port, p0.hop_ip, hop, met, argv, tmp_path / "tokenless.log")
    bare.start()
    try:
        async with session.get(f"http://{p0.hop_ip}:{hop}/headers", headers=forged) as r:
            seen = dict(json.loads(await r.read()))
        assert r.status == 200
        for name in ("fly-client-ip", "x-forwarded-for", "forwarded", "fly-region"):
            assert name not in seen, (name, seen)
    finally:
        bare.stop()


async def test_force_instance_and_prefer_region(apps, session):
    p0 = apps.proxies[0]
    for _ in range(3):
        assert (await get(session, p0, "web", **{"fly-force-instance-id": "web-1"}))[2] == b"web-1\n"
    status, _, _ = await get(session, p0, "web", **{"fly-force-instance-id": "nope"})
    assert status == 404
    assert (await get(session, p0, "web", **{"fly-prefer-region": "r1"}))[2] == b"web-1\n"


async def test_replay_header_moves_the_request(apps, session):
    p0 = apps.proxies[0]
    status, headers, body = await get(session, p0, "web", "/replay?to=region=r1")
    assert status == 200 and headers["x-machine-id"] == "web-1" and "fly-replay" not in headers
    status, headers, _ = await get(session, p0, "web", "/replay?to=instance=web-0")
    assert headers["x-machine-id"] == "web-0"


async def test_streaming_and_large_bodies_both_ways(apps, session):
    p1 = apps.proxies[1]
    async with session.get(p1.url + "/stream?n=5", headers={"Host": f"web.{p1.domain}"}) as r:
        assert r.headers["transfer-encoding"] == "chunked"
        assert await r.read() == b"".join(b"chunk %d\n" % i for i in range(5))
    big = bytes(range(256)) * 12000  # 3 MB: over the replay limit, streamed through
    async with session.post(p1.url + "/echo", data=big, headers={"Host": f"web.{p1.domain}"}) as r:
        assert r.status == 200 and await r.read() == big


async def test_websocket_through_edge_and_host(apps, session):
    p1 = apps.proxies[1]
    async with session.ws_connect(p1.url + "/ws", headers={"Host": f"web.{p1.domain}", "fly-force-instance-id": "web-0"}) as ws:
        for text in ("hello", "x" * 70000):
            await ws.send_str(text)
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.data == text


async def test_instance_timeout_gives_504(apps, session):
    status, headers, _ = await get(session, apps.proxies[0], "web", "/slow?ms=5000")
    assert status == 504 and headers["kubefly-error"] == "timeout"


async def test_total_timeout_answers_504_and_frees_the_slot(apps, session):
    """An instance slower than the total timeout (its head within the response timeout
    would not help): 504 within the bound, and its slot free again at once."""
    p0, p1 = apps.proxies
    original = apps.config.read_text()
    cfg = yaml.safe_load(original)
    apps.config.write_text(yaml.safe_dump({**cfg, "total_timeout_s": 1.5, "response_timeout_s": 20.0}))
    for p in apps.proxies:
        p.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    try:
        timeouts = p1.metric("kubefly_proxy_requests_total", app="hot", code="504")
        started = time.monotonic()
        # Through host-001's edge to hot-a on host-000 (hard limit 1), which would answer after 12 s.
        status, headers, body = await get(session, p1, "hot", "/slow?ms=12000", **{"fly-force-instance-id": "hot-a"})
        took = time.monotonic() - started
        assert status == 504 and headers["kubefly-error"] == "timeout" and b"timed out" in body
        assert 1.5 <= took < 6.0  # the timeout plus the once-a-second sweep, not the instance's 12 s
        assert p1.metric("kubefly_proxy_requests_total", app="hot", code="504") == timeouts + 1
        # The edge closed its hop: host-000's proxy gave up the exchange and hot-a's only slot.
        status, headers, _ = await get(session, p0, "hot", **{"fly-force-instance-id": "hot-a"})
        assert status == 200 and headers["x-machine-id"] == "hot-a"
        assert time.monotonic() - started < 10.0  # well before the instance would have answered
    finally:
        apps.config.write_text(original)
        for p in apps.proxies:
            p.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)


async def test_one_apps_flood_does_not_starve_another(apps, session):
    p0 = apps.proxies[0]
    flood = [asyncio.create_task(get(session, p0, "flood", "/slow?ms=2000")) for _ in range(40)]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    status, _, _ = await get(session, p0, "web")
    assert status == 200 and time.monotonic() - started < 1.5
    statuses = [s for s, _, _ in await asyncio.gather(*flood)]
    assert statuses.count(200) == 20 and statuses.count(503) == 20  # the app's budget is 20 in flight


async def test_autostart_then_autostop(apps, session):
    p0 = apps.proxies[0]
    pidfile = apps.stoppable(0, "sleepy-0", "sleepy")
    # The proxy only knows the app once its stopped row has gossiped in.
    deadline = time.monotonic() + 20
    while (await get(session, p0, "sleepy"))[0] == 404:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    # That request (or the one above) started the machine and was held until it passed its checks.
    status, headers, body = await get(session, p0, "sleepy")
    assert status == 200 and body == b"sleepy-0\n"
    assert p0.metric("kubefly_proxy_autostarts_total", app="sleepy") >= 1
    # Idle on two autostop passes (1 s apart): stopped, its process gone.
    deadline = time.monotonic() + 20
    machine = apps.agents[0].machines / "sleepy-0.json"
    while json.loads(machine.read_text())["state"] != "stopped":
        assert time.monotonic() < deadline, "idle machine was not stopped"
        await asyncio.sleep(0.2)
    while p0.metric("kubefly_proxy_autostops_total", app="sleepy") < 1:  # counted once the starter returns
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    assert not pidfile.exists()
    assert p0.metric("kubefly_proxy_autostops_total", app="sleepy") == 1


async def test_reload_and_graceful_restart_drop_nothing(apps, session):
    p0 = apps.proxies[0]
    inflight = [asyncio.create_task(get(session, p0, "web", "/slow?ms=1500")) for _ in range(5)]
    await asyncio.sleep(0.3)
    cfg = yaml.safe_load(apps.config.read_text())
    apps.config.write_text(yaml.safe_dump({**cfg, "retry_budget_s": 1.5}))
    p0.proc.send_signal(signal.SIGHUP)  # config change: nothing in flight notices
    assert [s for s, _, _ in await asyncio.gather(*inflight)] == [200] * 5
    assert p0.proc.poll() is None
    # A new process binds the same port (SO_REUSEPORT), the old one drains and exits.
    inflight = [asyncio.create_task(get(session, p0, "web", "/slow?ms=1500")) for _ in range(5)]
    await asyncio.sleep(0.3)
    old = p0.proc
    metrics_flag = p0.argv.index("--metrics-listen") + 1
    p0.metrics_port = free_port()  # /metrics has no SO_REUSEPORT: the new process takes another port
    p0.argv[metrics_flag] = f"127.0.0.1:{p0.metrics_port}"
    p0.start()
    await asyncio.sleep(0.3)
    old.send_signal(signal.SIGTERM)
    assert [s for s, _, _ in await asyncio.gather(*inflight)] == [200] * 5
    assert await asyncio.to_thread(old.wait, 15) == 0
    assert (await get(session, p0, "web"))[0] == 200


HEADER_CHARS = st.binary(min_size=0, max_size=40)


@st.composite
def malformed(draw):
    """Requests that are broken in ways parsers disagree on."""
    line = draw(st.sampled_from([b"GET / HTTP/1.1", b"POST / HTTP/1.1", b"GET  / HTTP/1.1", b"GET / HTTP/1.1 x",
                                 b"GET / HTTP/9.9", b"G\x00T / HTTP/1.1", draw(HEADER_CHARS)]))
    headers = [b"Host: web.test"]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Host", b"X", b"Content-Length ",
                                     b" Transfer-Encoding", b"X\x01Y", draw(HEADER_CHARS)]))
        value = draw(st.sampled_from([b"5", b"-1", b"chunked", b"chunked, identity", b"0x10", b"5\r\nX: y", b"\x7f",
                                      draw(HEADER_CHARS)]))
        headers.append(name + b": " + value)
    body = draw(st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", draw(HEADER_CHARS)]))
    return line + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=malformed())
def test_fuzzed_requests_never_crash_the_proxy(apps, raw):
    import socket

    p0 = apps.proxies[0]
    with socket.create_connection(("127.0.0.1", p0.port), timeout=10) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if data:
        status = int(data.split(b" ", 2)[1])
        # Refused with a 4xx (501 for a transfer coding it does not do), or, when the
        # mutation happened to be a valid request, answered by the app.
        assert 400 <= status < 500 or status in (200, 501), data[:200]
    assert p0.proc.poll() is None


def test_proxy_logs_are_json(apps):
    for line in Path(apps.proxies[1].log).read_text().splitlines():
        assert isinstance(json.loads(line), dict)
