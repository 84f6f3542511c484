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
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = ReplicaClient(f"http://127.0.0.1:{port}")
    try:
        await client.start()
        assert await client.replica.wait_for(lambda r: len(r.instances("acme", "big")) == 5001, 10)
        # the stream ended; the client reconnects and replaces its state with the new snapshot
        assert await client.replica.wait_for(lambda r: len(sessions) == 2 and len(r.instances()) == 5000, 10)
    finally:
        done.set()
        await client.close()
        await runner.cleanup()
