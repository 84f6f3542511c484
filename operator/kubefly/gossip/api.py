"""The agent's local HTTP API (loopback only): what the proxy and DNS read.

GET  /v1/instances[?org=&app=]  {"self", "instances", "rtt"}
GET  /v1/watch                  NDJSON: a snapshot line, then upsert/delete/rtt lines
POST /v1/load                   {"loads": [{"org", "machine_id", "load"}]} for this host's rows;
                                with a load token, only with `Authorization: Bearer <token>` (401)
GET  /v1/members                membership as this agent sees it
POST /v1/admin/partition        {"drop": [host, ...]}: drop all traffic to/from these peers; only
                                with --admin-api (fault injection for tests), else 404
GET  /metrics, /healthz

Loopback is not a trust boundary on a host whose network other host-network
processes share: what can change routing is authenticated or switched off.

`make_members_app` serves GET /v1/members alone (read-only) on the host's own
address, for the operator: its view of host health beside the Node's.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from aiohttp import web

from kubefly import metrics
from kubefly.gossip.agent import Agent

_NL = b"\n"


def _line(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + _NL


def members_doc(agent: Agent) -> dict:
    ms = agent.members
    return {
        "self": {"host": ms.me.host, "region": ms.me.region, "incarnation": ms.me.inc},
        "members": [{"host": m.host, "addr": f"{m.ip}:{m.port}", "region": m.region, "state": m.state,
                     "incarnation": m.inc, "rtt": m.rtt} for m in ms.members.values()],
    }


def make_members_app(agent: Agent) -> web.Application:
    async def members(req: web.Request) -> web.Response:
        return web.json_response(members_doc(agent))

    app = web.Application()
    app.add_routes([web.get("/v1/members", members)])
    return app


def make_app(agent: Agent, *, admin: bool = False, load_token: str | None = None) -> web.Application:
    async def instances(req: web.Request) -> web.Response:
        org, app = req.query.get("org"), req.query.get("app")
        snap = agent.snapshot()
        snap.pop("type")
        if org or app:
            snap["instances"] = [i.model_dump(mode="json") for i in agent.instances(org, app)]
        return web.json_response(snap)

    async def watch(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(req)
        q = agent.subscribe()
        try:
            await resp.write(_line(agent.snapshot()))
            while True:
                try:
                    doc = await asyncio.wait_for(q.get(), 15.0)
                except asyncio.TimeoutError:
                    await resp.write(_NL)  # keepalive: finds dead clients
                    continue
                if doc is None:  # the client fell too far behind
                    break
                await resp.write(_line(doc))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            agent.unsubscribe(q)
        return resp

    async def load(req: web.Request) -> web.Response:
        if load_token is not None and not hmac.compare_digest(
                req.headers.get("Authorization", "").encode(), f"Bearer {load_token}".encode()):
            return web.json_response({"error": "POST /v1/load needs the proxies' token (Authorization: Bearer)"},
                                     status=401)
        try:
            body = await req.json()
            loads = {(str(e["org"]), str(e["machine_id"])): int(e["load"]) for e in body["loads"]}
            if any(v < 0 for v in loads.values()):
                raise ValueError("negative load")
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"bad body: {exc}"}, status=400)
        refused = agent.report_loads(loads)
        if refused:
            return web.json_response(
                {"error": "not instances of this host", "refused": [list(k) for k in refused]}, status=422)
        return web.json_response({"accepted": len(loads)})

    async def members(req: web.Request) -> web.Response:
        return web.json_response(members_doc(agent))

    async def partition(req: web.Request) -> web.Response:
        body = await req.json()
        agent.dropped = {str(h) for h in body.get("drop", [])}
        return web.json_response({"drop": sorted(agent.dropped)})

    async def prom(req: web.Request) -> web.Response:
        data, ctype = metrics.exposition()
        return web.Response(body=data, headers={"Content-Type": ctype})

    async def healthz(req: web.Request) -> web.Response:
        return web.json_response({"ok": True, "host": agent.cfg.host, "members": agent.members.size()})

    app = web.Application()
    app.add_routes([
        web.get("/v1/instances", instances), web.get("/v1/watch", watch), web.post("/v1/load", load),
        web.get("/v1/members", members), web.get("/metrics", prom), web.get("/healthz", healthz),
    ])
    if admin:
        app.add_routes([web.post("/v1/admin/partition", partition)])
    return app
