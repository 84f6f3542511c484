"""Autostart and autostop of Machines as the agent sees them on a cluster: a Machine
object without a pod (applied `state: stopped`) is a row from its host's agent,
gossiped, never routable; a request at another host's edge starts it and is held
until it serves; idle, it is stopped, and the next request wakes it again.

The starter plays the operator (starter.py): it sets spec.state, writes or removes
the Pod beside the Machine, and sets status.state."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import aiohttp
import pytest

pytestmark = pytest.mark.component


async def get(session, proxy, app, path="/"):
    async with session.get(proxy.url + path, headers={"Host": f"{app}.{proxy.domain}"}) as r:
        return r.status, dict(r.headers), await r.read()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as s:
        yield s


def rows(agent, app: str) -> list[dict]:
    with urllib.request.urlopen(f"{agent.api}/v1/instances?org=acme&app={app}", timeout=5) as r:
        return json.loads(r.read())["instances"]


async def until(what: str, predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.1)
    return got


async def test_a_machine_applied_stopped_is_woken_by_requests_and_stopped_when_idle(platform, session):
    p0, p1 = platform.proxies
    machine = platform.stopped_machine(1, "lazy-1", "lazy")  # on host-001 (r1); the client is at host-000 (r0)
    pod = machine.with_name("lazy-1-pod.json")

    # Before any request: host-000's replica holds the created machine, from host-001's agent, not routable.
    row = (await until("the created machine's row at host-000", lambda: rows(platform.agents[0], "lazy")))[0]
    assert (row["state"], row["host"], row["address"], row["check_status"]) == ("created", "host-001", "", "passing")
    assert not pod.exists()

    # The first request starts it and is held until it serves (through host-001's proxy).
    started = time.monotonic()
    status, _, body = await get(session, p0, "lazy")
    first = time.monotonic() - started
    print(f"[component] autostart of a created machine on another host: first byte after {first:.2f}s")
    assert (status, body) == (200, b"lazy-1\n")
    assert json.loads(machine.read_text())["spec"]["state"] == "started" and pod.exists()
    assert p0.metric("kubefly_proxy_autostarts_total", app="lazy") == 1

    # Idle on two autostop passes (1 s apart): host-001's proxy, the one deciding for r1, stops it.
    await until("the idle machine stopped", lambda: json.loads(machine.read_text())["spec"]["state"] == "stopped"
                and not pod.exists())
    await until("the autostop counted", lambda: p1.metric("kubefly_proxy_autostops_total", app="lazy") == 1)
    await until("host-000 sees it stopped", lambda: [r["state"] for r in rows(platform.agents[0], "lazy")] == ["stopped"])

    # Stopped is not gone: concurrent requests wake it again and are all served by it.
    started = time.monotonic()
    answers = await asyncio.gather(*(get(session, p0, "lazy") for _ in range(5)))
    print(f"[component] wake after autostop, 5 concurrent requests: all answered after {time.monotonic() - started:.2f}s")
    assert [(s, b) for s, _, b in answers] == [(200, b"lazy-1\n")] * 5
    assert json.loads(machine.read_text())["spec"]["state"] == "started"
    assert p0.metric("kubefly_proxy_autostarts_total", app="lazy") >= 2


async def test_a_machine_that_exited_for_good_is_not_started_and_the_request_is_told(platform, session):
    """Started, no pod, Ready=Exited under its current spec: setting spec.state started
    again would change nothing, so the proxy does not hold requests for it."""
    p0 = platform.proxies[0]
    machine = platform.stopped_machine(0, "done-0", "done")
    doc = json.loads(machine.read_text())
    doc["spec"]["state"] = "started"
    doc["status"].update(state="stopped", conditions=[{"type": "Ready", "status": "False", "reason": "Exited",
                                                       "observedGeneration": 1}])
    machine.write_text(json.dumps(doc))
    await until("the exited machine's row", lambda: [r["state"] for r in rows(platform.agents[0], "done")] == ["failed"])
    started = time.monotonic()
    status, headers, _ = await get(session, p0, "done")
    assert status == 503 and headers["kubefly-error"] == "no-instance" and time.monotonic() - started < 5
    assert p0.metric("kubefly_proxy_autostarts_total", app="done") == 0


async def test_a_request_for_a_machine_being_stopped_waits_and_starts_it_once_stopped(platform, session):
    from starter import set_machine

    p0 = platform.proxies[0]
    # Autostop asked: spec.state stopped, status stopping, the pod terminating.
    machine = platform.stopped_machine(1, "ebb-1", "ebb", status="stopping", terminating=True)
    await until("the stopping row at host-000", lambda: [r["state"] for r in rows(platform.agents[0], "ebb")] == ["stopping"])

    held = asyncio.create_task(get(session, p0, "ebb"))
    await asyncio.sleep(1.0)
    assert not held.done(), "held while the machine stops, not refused"
    set_machine(platform.starter_spec["ebb-1"], "stopped", "stopped")  # the pod is gone: now it can be started
    status, _, body = await asyncio.wait_for(held, 30)
    assert (status, body) == (200, b"ebb-1\n")
    assert json.loads(machine.read_text())["spec"]["state"] == "started"


async def test_a_request_held_for_a_machine_that_goes_away_is_answered_at_once(platform, session):
    p0 = platform.proxies[0]
    machine = platform.stopped_machine(1, "gone-1", "gone", status="stopping", terminating=True)
    await until("the stopping row at host-000", lambda: [r["state"] for r in rows(platform.agents[0], "gone")] == ["stopping"])
    held = asyncio.create_task(get(session, p0, "gone"))
    await asyncio.sleep(0.5)
    assert not held.done()
    machine.unlink()  # the Machine is deleted: its pod and then its row go
    machine.with_name("gone-1-pod.json").unlink()
    started = time.monotonic()
    status, headers, _ = await asyncio.wait_for(held, 30)
    assert status == 503 and headers["kubefly-error"] == "no-instance" and time.monotonic() - started < 5
