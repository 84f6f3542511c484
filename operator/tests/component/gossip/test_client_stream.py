"""ReplicaClient against a real HTTP server speaking the watch protocol (no agent needed)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from kubefly.gossip.client import ReplicaClient
from kubefly.gossip.harness import free_port

pytestmark = pytest.mark.component


def inst(i: int) -> dict:
    return {"org": "acme", "app": "big", "machine_id": f"m{i:05d}", "instance_id": f"i{i}", "region": "r0",
            "host": "h1", "address": "10.0.0.1", "state": "started", "check_status": "passing",
            "services": [{"internal_port": 8080, "ports": [80, 443]}]}


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """The fake agent on a free loopback port: its runner and base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_multi_megabyte_snapshot_line_and_reconnect():
    rows = [inst(i) for i in range(5000)]  # a snapshot line of ~2 MB
    sessions = []
    done = asyncio.Event()

    async def watch(req):
        resp = web.StreamResponse()
        await resp.prepare(req)
        sessions.append(resp)
        snap = {"type": "snapshot", "self": {"host": "h1", "region": "r0"}, "instances": rows, "rtt": {}}
        await resp.write(json.dumps(snap).encode() + b"\n")
        if len(sessions) == 1:
            await resp.write(json.dumps({"type": "upsert", "instance": inst(99999)}).encode() + b"\n")
            return resp  # the "agent" goes away
        await done.wait()
        return resp

    app = web.Application()
    app.router.add_get("/v1/watch", watch)
    runner, url = await serve(app)
    client = ReplicaClient(url)
    try:
        await client.start()
        assert await client.replica.wait_for(lambda r: len(r.instances("acme", "big")) == 5001, 10)
        # the stream ended; the client reconnects and replaces its state with the new snapshot
        assert await client.replica.wait_for(lambda r: len(sessions) == 2 and len(r.instances()) == 5000, 10)
    finally:
        done.set()
        await client.close()
        await runner.cleanup()


async def test_members_are_polled_only_by_a_client_that_asks():
    """The proxy asks for member addresses (it hops to other hosts); DNS does not."""
    polls = {"dns": 0, "proxy": 0}
    done = asyncio.Event()

    async def watch(req):
        resp = web.StreamResponse()
        await resp.prepare(req)
        snap = {"type": "snapshot", "self": {"host": "h1", "region": "r0"}, "instances": [inst(1)], "rtt": {}}
        await resp.write(json.dumps(snap).encode() + b"\n")
        await done.wait()
        return resp

    async def members(req):
        polls[req.match_info["reader"]] += 1
        return web.json_response({"members": [{"host": "h2", "addr": "10.1.0.2:7946", "state": "alive"}]})

    app = web.Application()
    app.router.add_get("/{reader}/v1/watch", watch)
    app.router.add_get("/{reader}/v1/members", members)
    runner, url = await serve(app)
    with pytest.raises(ValueError, match="members_interval"):
        ReplicaClient(url, members_interval=0)
    dns = ReplicaClient(f"{url}/dns")
    proxy = ReplicaClient(f"{url}/proxy", members_interval=0.05)
    try:
        await dns.start()
        await proxy.start()
        assert await proxy.replica.wait_for(lambda r: polls["proxy"] >= 3, 10)
        assert proxy.replica.host_ip("h2") == "10.1.0.2"
        # The DNS client followed the same agent for as long, several poll intervals, and never asked.
        assert dns.connected and len(dns.replica.instances()) == 1
        assert polls["dns"] == 0 and dns.replica.host_ip("h2") is None
    finally:
        done.set()
        await dns.close()
        await proxy.close()
        await runner.cleanup()
