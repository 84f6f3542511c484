"""Autostart and autostop on kind, as a user meets them: a Machine applied with
`state: stopped` answers the first request through the mapped proxy port (the
request is held while it boots), and a machine stopped for being idle wakes
again on the next request. The proxy learns of stopped machines from the agent
of the host each is placed on (which reads the Machine: a stopped machine has
no pod), never from the API on the request path.

Figures (first byte after autostart, idle time before autostop) are printed,
not asserted: they move with the machine's load."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from .kindlib import KindCluster
from .test_kind_machines import DOMAIN, machine

# The proxy's autostop pass runs every autostop_interval_s (60 s, not set by the chart) and stops a
# machine idle on two passes in a row: 60-120 s of idleness, plus the pass that notices it.
AUTOSTOP_WITHIN_S = 200


def lazy(kind: KindCluster, name: str, app: str, region: str, state: str) -> dict:
    m = machine(kind, name, region)
    m["spec"].update(app=app, state=state)
    m["spec"]["services"][0].update(autostart=True, autostop="stop")
    return m


def get_machine(kind: KindCluster, namespace: str, name: str) -> dict:
    return json.loads(kind.kubectl("-n", namespace, "get", "machine", name, "-o", "json").stdout)


def request(kind: KindCluster, app: str, namespace: str, timeout: float = 40) -> tuple[int, str]:
    """One GET through the edge's mapped port: (status, body); (0, error) when nothing answered."""
    req = urllib.request.Request(f"http://127.0.0.1:{kind.host_port(8080)}/",
                                 headers={"Host": f"{app}.{namespace}.{DOMAIN}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode().strip()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode().strip()
    except OSError as exc:
        return 0, str(exc)


def first_request_after_the_app_is_known(kind: KindCluster, app: str, namespace: str) -> tuple[int, str, float]:
    """Until the edge knows the app (its stopped machine's row has gossiped in), requests answer 404
    at once and start nothing; the first one that is not a 404 is the one that woke a machine.
    Returns its status, body and how long it took."""
    def attempt():
        started = time.monotonic()
        status, body = request(kind, app, namespace)
        return None if status == 404 else (status, body, time.monotonic() - started)

    return kind.wait_for(f"the edge proxy to know app {app}", attempt, timeout=60, interval=0.2)


def test_a_machine_applied_stopped_is_started_by_the_first_request(kind: KindCluster, namespace: str):
    kind.apply(lazy(kind, "lazy-1", "lazy", "ams", "stopped"), namespace)
    m = kind.wait_for("lazy-1 placed and created", lambda: (m := get_machine(kind, namespace, "lazy-1"))
                      .get("status", {}).get("state") == "created" and m["status"].get("host") and m, timeout=60)
    host = m["status"]["host"]
    assert not kind.kubectl("-n", namespace, "get", "pods", "-o", "name").stdout.strip(), "a created machine has no pod"

    status, body, took = first_request_after_the_app_is_known(kind, "lazy", namespace)
    print(f"[kind] autostart of a created machine on {host}: first byte {took:.2f}s after the request")
    assert (status, body) == (200, "lazy-1")
    m = get_machine(kind, namespace, "lazy-1")
    assert m["spec"]["state"] == "started" and m["status"]["state"] == "started" and m["status"]["host"] == host


def test_a_machine_stopped_when_idle_wakes_again_on_the_next_request(kind: KindCluster, namespace: str):
    kind.apply(lazy(kind, "nap-1", "nap", "ams", "started"), namespace)
    kind.wait_for("nap-1 started", lambda: get_machine(kind, namespace, "nap-1").get("status", {}).get("state") == "started",
                  timeout=120)
    started = time.monotonic()
    # Nobody sends it anything: the proxy on its host stops it (spec.state stopped, its pod deleted).
    kind.wait_for(f"nap-1 autostopped within {AUTOSTOP_WITHIN_S}s of idleness",
                  lambda: (m := get_machine(kind, namespace, "nap-1"))["spec"]["state"] == "stopped"
                  and m["status"].get("state") == "stopped", timeout=AUTOSTOP_WITHIN_S, interval=2)
    print(f"[kind] autostop of an idle machine: stopped {time.monotonic() - started:.0f}s after it started")

    # Stopped is not gone: the edge still knows the app, and the next request wakes it.
    begun = time.monotonic()
    status, body = request(kind, "nap", namespace)
    print(f"[kind] wake after autostop: first byte {time.monotonic() - begun:.2f}s after the request")
    assert (status, body) == (200, "nap-1")
    m = get_machine(kind, namespace, "nap-1")
    assert m["spec"]["state"] == "started" and m["status"]["state"] == "started"
