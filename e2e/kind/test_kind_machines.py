"""Machines on kind: a Machine becomes a real Running pod on a worker of its
region, running the app image, and the edge proxy routes a request through
kind-config.yaml's mapped host port to it (agents gossip where it runs)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request

from .kindlib import TOOLS_BIN, KindCluster

DOMAIN = "kubefly.localhost"  # the proxy's default platform domain


def machine(kind: KindCluster, name: str, region: str) -> dict:
    return {
        "apiVersion": "kubefly.dev/v1alpha1",
        "kind": "Machine",
        "metadata": {"name": name},
        "spec": {
            "app": "hello",
            "region": region,
            "image": kind.images["testapp"],
            "guest": {"cpuKind": "shared", "cpus": 1, "memoryMb": 256},
            "services": [{"internalPort": 8080, "protocol": "tcp", "ports": [{"port": 80, "handlers": ["http"]}]}],
        },
    }


def test_machines_run_as_pods_in_their_region_and_answer_through_the_proxy(kind: KindCluster, namespace: str):
    regions = {"hello-1": "ams", "hello-2": "iad"}
    kind.apply([machine(kind, name, region) for name, region in regions.items()], namespace)
    node_region = {n["metadata"]["name"]: n["metadata"]["labels"].get("topology.kubernetes.io/region")
                   for n in json.loads(kind.kubectl("get", "nodes", "-o", "json").stdout)["items"]}

    def running():
        pods = json.loads(kind.kubectl("-n", namespace, "get", "pods", "-o", "json").stdout)["items"]
        ready = {p["metadata"]["name"]: p for p in pods
                 if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}
        return ready if set(ready) >= set(regions) else None

    pods = kind.wait_for("both Machines' pods Running and Ready", running, timeout=180)
    for name, region in regions.items():
        pod = pods[name]
        assert node_region[pod["spec"]["nodeName"]] == region
        assert pod["spec"]["containers"][0]["image"] == kind.images["testapp"]

    url = f"http://127.0.0.1:{kind.host_port(8080)}/"
    request = urllib.request.Request(url, headers={"Host": f"hello.{namespace}.{DOMAIN}"})

    def answer(path: str = ""):
        try:
            return urllib.request.urlopen(urllib.request.Request(url + path, headers=request.headers), timeout=5).read().decode().strip()
        except (urllib.error.HTTPError, OSError):
            return None

    # The agents learn of the instances by gossip; then the proxy routes to one.
    assert kind.wait_for(f"{url} routed to a hello Machine", answer, timeout=120) in regions

    # A machine answering "full" (503 + kubefly-full) is retried on the other one, whichever the edge tried first.
    for taker in regions:
        got = {answer(f"full?except={taker}") for _ in range(6)}
        assert got == {taker}, f"every request for /full?except={taker} answered by {taker}, got {got}"

    # With the ams machine stopped, the edge (an ams worker) must hop to the iad worker's proxy.
    kind.kubectl("-n", namespace, "patch", "machine", "hello-1", "--type=merge", "-p", '{"spec":{"state":"stopped"}}')
    assert kind.wait_for(f"{url} routed to hello-2 on another worker, through its host's proxy",
                         lambda: answer() == "hello-2" and "hello-2", timeout=120) == "hello-2"


def watch_pods(kind: KindCluster, namespace: str) -> tuple[subprocess.Popen, list[dict]]:
    """Every watch event of the namespace's pods, gathered by a thread. A stopped machine's pod is
    deleted, so its container's last state (exit code, termination message) shows only on a watch."""
    proc = subprocess.Popen(
        [str(TOOLS_BIN / "kubectl"), "--kubeconfig", str(kind.kubeconfig), "-n", namespace,
         "get", "pods", "--watch", "--output-watch-events", "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    seen: list[dict] = []

    def read() -> None:
        decoder, buf = json.JSONDecoder(), ""
        for line in proc.stdout:
            buf += line
            try:
                event, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                continue  # not a whole object yet
            seen.append(event)
            buf = buf.lstrip()[end:]

    threading.Thread(target=read, daemon=True).start()
    return proc, seen


def test_a_stop_sends_the_machines_stop_signal_and_its_timeout_is_the_grace_period(kind: KindCluster, namespace: str):
    # The test app exits at a stop signal and names it in its termination message.
    stops = {"sig-int": {"signal": "SIGINT", "timeoutSeconds": 5}, "sig-term": {"signal": "SIGTERM", "timeoutSeconds": 7}}
    manifests = []
    for name, stop in stops.items():
        m = machine(kind, name, "ams")
        m["spec"].update(app="stopsig", stop=stop)
        manifests.append(m)
    kind.apply(manifests, namespace)
    for name in stops:
        kind.kubectl("-n", namespace, "wait", "--for=condition=Ready", f"machine/{name}", "--timeout=180s", timeout=200)
    pods = {name: json.loads(kind.kubectl("-n", namespace, "get", "pod", name, "-o", "json").stdout) for name in stops}
    assert pods["sig-int"]["spec"]["terminationGracePeriodSeconds"] == 5
    assert pods["sig-int"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == [
        "/bin/sh", "-c", "kill -s INT 1 && exec sleep 5"]
    assert pods["sig-term"]["spec"]["terminationGracePeriodSeconds"] == 7
    assert "lifecycle" not in pods["sig-term"]["spec"]["containers"][0]  # the runtime's own signal

    proc, seen = watch_pods(kind, namespace)
    try:
        kind.wait_for("the pod watch to list both pods", lambda: len(seen) >= len(stops), timeout=30)
        started = time.monotonic()
        for name in stops:
            kind.kubectl("-n", namespace, "patch", "machine", name, "--type=merge", "-p", '{"spec":{"state":"stopped"}}')
        for name in stops:
            kind.kubectl("-n", namespace, "wait", "--for=condition=Stopped", f"machine/{name}", "--timeout=60s", timeout=80)
        print(f"\n[stop signal] both machines Stopped {time.monotonic() - started:.1f}s after the stop")
        time.sleep(1)  # the watch's last events
    finally:
        proc.terminate()

    def terminated(name: str) -> dict | None:
        for event in reversed(seen):
            pod = event.get("object") or {}
            if pod.get("metadata", {}).get("name") != name:
                continue
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                if "terminated" in (status.get("state") or {}):
                    return status["state"]["terminated"]
        return None

    for name, signal in (("sig-int", "SIGINT"), ("sig-term", "SIGTERM")):
        last = terminated(name)
        assert last is not None, f"no terminated state of {name}'s container on the watch ({len(seen)} events)"
        assert (last["exitCode"], last.get("message")) == (0, f"testapp: received {signal}, exiting"), last
        state = kind.kubectl("-n", namespace, "get", "machine", name, "-o", "jsonpath={.status.state}").stdout
        assert state == "stopped"  # it ran, so not `created`
    pod_events = json.loads(kind.kubectl("-n", namespace, "get", "events", "--field-selector",
                                         "involvedObject.kind=Pod", "-o", "json").stdout)["items"]
    hook_failed = {e["involvedObject"]["name"] for e in pod_events if e["reason"] == "FailedPreStopHook"}
    # As docs/machines.md says: the hook dies with PID 1's namespace, so the kubelet reports it failed.
    assert hook_failed == {"sig-int"}, sorted({(e["involvedObject"]["name"], e["reason"]) for e in pod_events})
