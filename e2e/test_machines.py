"""Machines on the real control plane: placement, states, the pod, restarts, host loss, maintenance.

kwok hosts run no containers: a pod goes Running/Ready by itself, and a
container exit is simulated by writing the pod's status as a kubelet would.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from kubefly import labels, topology

pytestmark = pytest.mark.usefixtures("operator")


def apply(kube, namespace, name, **spec):
    spec = {"app": "web", "region": "ams", "image": "nginx:1.27", **spec}
    manifest = {"apiVersion": "kubefly.dev/v1alpha1", "kind": "Machine",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def get(kube, namespace, kind, name):
    proc = kube.kubectl("-n", namespace, "get", kind, name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def cond(machine, type_):
    return next((c for c in (machine.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def wait_machine(kube, namespace, name, what, pred, timeout=60):
    def probe():
        m = get(kube, namespace, "machine", name)
        return m if m and pred(m) else None
    return kube.wait_for(f"machine {name}: {what}", probe, timeout=timeout)


def state_is(*states):
    return lambda m: (m.get("status") or {}).get("state") in states


def ready(m):
    c = cond(m, "Ready")
    return (m.get("status") or {}).get("state") == "started" and c and c["status"] == "True"


def events(kube, namespace, name):
    out = json.loads(kube.kubectl("-n", namespace, "get", "events", "--field-selector",
                                  f"involvedObject.name={name},involvedObject.kind=Machine", "-o", "json").stdout)
    return [e["reason"] for e in out["items"]]


def patch_pod_status(kube, namespace, name, status):
    kube.kubectl("-n", namespace, "patch", "pod", name, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": status}))


def test_machine_is_placed_and_started_as_a_pinned_pod(kube, namespace):
    apply(kube, namespace, "web-1", env={"GREETING": "hi"}, guest={"cpus": 2, "memoryMb": 512},
          services=[{"internalPort": 8080, "ports": [{"port": 80, "handlers": ["http"]}]}],
          checks=[{"name": "alive", "type": "tcp", "port": 8080}], stop={"timeoutSeconds": 20})
    m = wait_machine(kube, namespace, "web-1", "started and Ready", ready)
    st = m["status"]
    assert st["region"] == "ams" and st["host"] in {h.name for h in topology.load().workers if h.region == "ams"}
    assert st["version"] == 1 and st["instanceId"]
    assert [e["type"] for e in st["events"]][:2] == ["launch", "start"]
    pod = get(kube, namespace, "pod", "web-1")
    assert pod["spec"]["nodeName"] == st["host"]  # the scheduler bound it, honouring the affinity
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchFields"][0]["values"] == [st["host"]]
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "512Mi"}
    assert {"name": "GREETING", "value": "hi"} in c["env"]
    assert c["ports"][0]["containerPort"] == 8080
    assert pod["spec"]["readinessGates"] == [{"conditionType": "kubefly.dev/checks"}]  # every check gates readiness
    assert "readinessProbe" not in c and "livenessProbe" not in c
    assert pod["spec"]["terminationGracePeriodSeconds"] == 20 and pod["spec"]["restartPolicy"] == "OnFailure"
    md = pod["metadata"]
    assert md["labels"][labels.APP] == "web" and md["labels"][labels.MACHINE] == "web-1"
    assert md["labels"][labels.REGION] == "ams" and md["labels"][labels.HOST] == st["host"]
    assert md["annotations"][labels.INSTANCE_ID] == st["instanceId"]
    assert json.loads(md["annotations"][labels.SERVICES])[0]["internal_port"] == 8080
    assert {"Placed", "Started"} <= set(events(kube, namespace, "web-1"))
    table = kube.kubectl("-n", namespace, "get", "machines").stdout
    assert "STATE" in table and "started" in table


def test_no_host_fits_fails_fast_with_the_shortage_and_creates_nothing(kube, namespace):
    # 128 GiB does not fit any 8 GiB host.
    apply(kube, namespace, "big", guest={"cpuKind": "performance", "cpus": 2, "memoryMb": 131072})
    m = wait_machine(kube, namespace, "big", "failed", state_is("failed"), timeout=15)
    c = cond(m, "Placed")
    assert c["status"] == "False" and c["reason"] == "InsufficientCapacity"
    assert "region ams" in c["message"] and "memory" in c["message"] and "131072 MiB needed" in c["message"]
    assert get(kube, namespace, "pod", "big") is None
    assert "InsufficientCapacity" in events(kube, namespace, "big")
    apply(kube, namespace, "nowhere", region="nrt")
    m = wait_machine(kube, namespace, "nowhere", "failed", state_is("failed"), timeout=15)
    assert cond(m, "Placed")["reason"] == "NoHostsInRegion" and "nrt" in cond(m, "Placed")["message"]


def test_a_pod_the_api_server_refuses_fails_the_machine_with_the_reason(kube, namespace):
    kube.kubectl("-n", namespace, "create", "quota", "no-pods", "--hard=pods=0")
    apply(kube, namespace, "refused")
    m = wait_machine(kube, namespace, "refused", "failed", state_is("failed"), timeout=30)
    c = cond(m, "Ready")
    assert c["status"] == "False" and c["reason"] == "PodRefused", c
    assert "(403)" in c["message"] and "quota" in c["message"], c["message"]
    assert "PodRefused" in events(kube, namespace, "refused")
    assert get(kube, namespace, "pod", "refused") is None
    # Without the quota, a changed spec tries again and starts.
    kube.kubectl("-n", namespace, "delete", "quota", "no-pods")
    apply(kube, namespace, "refused", env={"AGAIN": "1"})
    wait_machine(kube, namespace, "refused", "started and Ready", ready)


def test_stopped_at_create_only_places_then_start_and_stop_keep_the_host(kube, namespace):
    apply(kube, namespace, "lazy", state="stopped", region="iad")
    m = wait_machine(kube, namespace, "lazy", "created", state_is("created"))
    host = m["status"]["host"]
    assert host and get(kube, namespace, "pod", "lazy") is None
    apply(kube, namespace, "lazy", state="started", region="iad")
    wait_machine(kube, namespace, "lazy", "started", ready)
    apply(kube, namespace, "lazy", state="stopped", region="iad")
    m = wait_machine(kube, namespace, "lazy", "stopped", state_is("stopped"))
    kube.wait_for("the pod to go", lambda: get(kube, namespace, "pod", "lazy") is None)
    apply(kube, namespace, "lazy", state="started", region="iad")
    m = wait_machine(kube, namespace, "lazy", "started again", ready)
    assert m["status"]["host"] == host and get(kube, namespace, "pod", "lazy")["spec"]["nodeName"] == host
    kinds = [(e["type"], e["status"]) for e in m["status"]["events"]]
    assert ("stop", "requested") in kinds and kinds.count(("start", "started")) == 2


def test_kubectl_wait_serves_a_machine_applied_stopped_before_and_after_it_ran(kube, namespace):
    # As on Fly: `created` until it has run, `stopped` after; condition Stopped is True in both.
    def wait(for_, timeout="60s"):
        return kube.kubectl("-n", namespace, "wait", f"--for={for_}", "machine/idle", f"--timeout={timeout}", check=False)

    apply(kube, namespace, "idle", state="stopped")
    out = wait("condition=Stopped")
    assert out.returncode == 0, out.stderr
    assert wait("jsonpath={.status.state}=created").returncode == 0
    m = get(kube, namespace, "machine", "idle")
    assert cond(m, "Stopped")["reason"] == "NeverStarted" and get(kube, namespace, "pod", "idle") is None
    apply(kube, namespace, "idle", state="started")
    assert wait("condition=Ready").returncode == 0
    assert cond(get(kube, namespace, "machine", "idle"), "Stopped")["status"] == "False"
    apply(kube, namespace, "idle", state="stopped")
    out = wait("condition=Stopped")
    assert out.returncode == 0, out.stderr
    assert wait("jsonpath={.status.state}=stopped", timeout="5s").returncode == 0
    assert cond(get(kube, namespace, "machine", "idle"), "Stopped")["reason"] == "Stopped"
    assert get(kube, namespace, "pod", "idle") is None


def test_stop_signal_and_timeout_reach_the_pod_as_the_api_server_keeps_it(kube, namespace):
    apply(kube, namespace, "quits", stop={"signal": "SIGUSR1", "timeoutSeconds": 7})
    apply(kube, namespace, "terms", stop={"signal": "SIGTERM", "timeoutSeconds": 9})
    kube.wait_for("both pods", lambda: get(kube, namespace, "pod", "quits") and get(kube, namespace, "pod", "terms"))
    quits = get(kube, namespace, "pod", "quits")["spec"]
    assert quits["terminationGracePeriodSeconds"] == 7
    assert quits["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == [
        "/bin/sh", "-c", "kill -s USR1 1 && exec sleep 7"]
    # SIGTERM is the runtime's own stop signal: no hook.
    terms = get(kube, namespace, "pod", "terms")["spec"]
    assert terms["terminationGracePeriodSeconds"] == 9 and "lifecycle" not in terms["containers"][0]


def test_spec_change_replaces_the_pod_on_the_same_host_with_a_new_version(kube, namespace):
    apply(kube, namespace, "web-2", region="syd")
    first = wait_machine(kube, namespace, "web-2", "started", ready)["status"]
    apply(kube, namespace, "web-2", region="syd", image="nginx:1.28")
    m = wait_machine(kube, namespace, "web-2", "version 2 started",
                     lambda m: ready(m) and m["status"].get("version") == 2)
    assert m["status"]["host"] == first["host"] and m["status"]["instanceId"] != first["instanceId"]
    pod = get(kube, namespace, "pod", "web-2")
    assert pod["spec"]["containers"][0]["image"] == "nginx:1.28"
    assert pod["metadata"]["annotations"][labels.INSTANCE_ID] == m["status"]["instanceId"]
    assert ("update", "replacing") in [(e["type"], e["status"]) for e in m["status"]["events"]]
    assert "Replacing" in events(kube, namespace, "web-2")


def test_restart_policy_no_exit_stops_with_the_exit_code(kube, namespace):
    apply(kube, namespace, "job", restart={"policy": "no"})
    wait_machine(kube, namespace, "job", "started", ready)
    patch_pod_status(kube, namespace, "job", {"phase": "Failed", "containerStatuses": [{
        "name": "machine", "image": "nginx:1.27", "imageID": "", "ready": False, "restartCount": 0,
        "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}]})
    m = wait_machine(kube, namespace, "job", "stopped", state_is("stopped"))
    last = m["status"]["events"][-1]
    assert last["type"] == "exit" and last["exitCode"] == 3
    assert cond(m, "Ready")["reason"] == "Exited"
    kube.wait_for("the dead pod to be cleared", lambda: get(kube, namespace, "pod", "job") is None)
    assert get(kube, namespace, "machine", "job")["status"]["state"] == "stopped"  # not restarted


def test_on_failure_gives_up_after_max_retries_with_oom_in_the_log(kube, namespace):
    apply(kube, namespace, "crashy", restart={"policy": "on-failure", "maxRetries": 1})
    wait_machine(kube, namespace, "crashy", "started", ready)
    for count in (1, 2):
        patch_pod_status(kube, namespace, "crashy", {"containerStatuses": [{
            "name": "machine", "image": "nginx:1.27", "imageID": "", "ready": False, "restartCount": count,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]})
        if count == 1:
            wait_machine(kube, namespace, "crashy", "the first exit logged",
                         lambda m: any(e["type"] == "exit" for e in m["status"].get("events", [])))
    m = wait_machine(kube, namespace, "crashy", "stopped after the last retry", state_is("stopped"))
    c = cond(m, "Ready")
    assert c["reason"] == "RestartLimitExceeded" and "maxRetries=1" in c["message"]
    exits = [e for e in m["status"]["events"] if e["type"] == "exit"]
    assert exits[0]["oomKilled"] is True and exits[0]["exitCode"] == 137
    assert {"OOMKilled", "RestartLimitExceeded"} <= set(events(kube, namespace, "crashy"))


def test_missing_secrets_and_volume_wait_without_a_pod(kube, namespace):
    apply(kube, namespace, "needs-secret", secrets=["db-creds"])
    m = wait_machine(kube, namespace, "needs-secret", "waiting for secrets",
                     lambda m: (cond(m, "SecretsReady") or {}).get("reason") == "WaitingForSecrets")
    assert "db-creds" in cond(m, "SecretsReady")["message"] and get(kube, namespace, "pod", "needs-secret") is None
    apply(kube, namespace, "needs-vol", mounts=[{"volume": "data", "path": "/data"}])
    m = wait_machine(kube, namespace, "needs-vol", "waiting for the volume",
                     lambda m: (cond(m, "Placed") or {}).get("reason") == "WaitingForVolume")
    assert "spec.mounts[0].volume" in cond(m, "Placed")["message"] and get(kube, namespace, "pod", "needs-vol") is None


def test_host_loss_is_reported_with_the_remedy_and_the_machine_stays(kube, namespace):
    region = f"t{uuid.uuid4().hex[:6]}"
    host = f"host-{region}"
    kube.cluster.add_host(host, region)
    try:
        apply(kube, namespace, "lonely", region=region)
        wait_machine(kube, namespace, "lonely", "started", ready)
        kube.cluster.stop_host(host)
        m = wait_machine(kube, namespace, "lonely", "host loss reported",
                         lambda m: (cond(m, "HostReady") or {}).get("reason") == "HostNotReady", timeout=120)
        assert "delete this Machine" in cond(m, "HostReady")["message"]
        assert m["status"]["host"] == host and cond(m, "Ready")["status"] == "False"
        assert "HostNotReady" in events(kube, namespace, "lonely")
        kube.cluster.delete_host(host)
        m = wait_machine(kube, namespace, "lonely", "host gone reported",
                         lambda m: (cond(m, "HostReady") or {}).get("reason") == "HostGone", timeout=60)
        assert m["status"]["host"] == host
    finally:
        kube.kubectl("delete", "node", host, "--ignore-not-found", "--wait=false")


def platform_settings(kube, **data):
    kube.kubectl("-n", kube.release_namespace, "patch", "configmap", "kubefly-platform", "--type=merge",
                 "-p", json.dumps({"data": data}))


def maintenance_seen(kube, operator, on: bool):
    """The operator polls the settings: wait until it reports the switch, so the test is not racing the poll."""
    import urllib.request

    line = f"kubefly_platform_maintenance {1.0 if on else 0.0}"
    kube.wait_for(f"the operator to see maintenance={on}",
                  lambda: line in urllib.request.urlopen(operator.metrics_url, timeout=5).read().decode())


def test_maintenance_holds_changes_to_started_machines_until_lifted(kube, namespace, operator):
    apply(kube, namespace, "steady", region="iad")
    wait_machine(kube, namespace, "steady", "started", ready)
    platform_settings(kube, maintenance="true", maintenanceReason="control plane upgrade",
                      maintenanceUntil="2030-01-01T10:00:00Z")
    try:
        maintenance_seen(kube, operator, True)
        apply(kube, namespace, "steady", region="iad", image="nginx:1.28")
        m = wait_machine(kube, namespace, "steady", "held", lambda m: (cond(m, "Held") or {}).get("status") == "True")
        c = cond(m, "Held")
        assert c["reason"] == "PlatformMaintenance"
        assert "control plane upgrade" in c["message"] and "2030-01-01T10:00:00Z" in c["message"]
        assert m["status"]["state"] == "started" and m["status"]["version"] == 1
        assert get(kube, namespace, "pod", "steady")["spec"]["containers"][0]["image"] == "nginx:1.27"
        # New machines are still created: maintenance holds changes to started ones only.
        apply(kube, namespace, "fresh", region="iad")
        wait_machine(kube, namespace, "fresh", "started during maintenance", ready)
    finally:
        platform_settings(kube, maintenance="false", maintenanceReason="", maintenanceUntil="")
    m = wait_machine(kube, namespace, "steady", "replaced after the lift",
                     lambda m: ready(m) and m["status"].get("version") == 2)
    assert cond(m, "Held")["status"] == "False"


def test_closed_region_refuses_new_machines(kube, namespace, operator):
    import urllib.request

    platform_settings(kube, closedRegions="syd")
    try:
        kube.wait_for("the operator to see syd closed", lambda: 'kubefly_region_closed{region="syd"} 1.0'
                      in urllib.request.urlopen(operator.metrics_url, timeout=5).read().decode())
        apply(kube, namespace, "late", region="syd")
        m = wait_machine(kube, namespace, "late", "failed", state_is("failed"), timeout=15)
        assert cond(m, "Placed")["reason"] == "RegionClosed" and "syd" in cond(m, "Placed")["message"]
    finally:
        platform_settings(kube, closedRegions="")


def test_destroy_removes_the_pod_and_metrics_count_creates_and_states(kube, namespace, operator):
    import urllib.request

    apply(kube, namespace, "gone", region="iad")
    wait_machine(kube, namespace, "gone", "started", ready)
    kube.kubectl("-n", namespace, "delete", "machine", "gone", "--wait=true", "--timeout=60s")
    assert get(kube, namespace, "pod", "gone") is None
    metrics = urllib.request.urlopen(operator.metrics_url, timeout=5).read().decode()
    assert 'kubefly_machine_creates_total{outcome="placed",region="iad"}' in metrics
    assert 'kubefly_machines{state="started"}' in metrics
    assert 'kubefly_reconcile_seconds_count{kind="Machine"}' in metrics


def test_every_check_gates_readiness_through_the_host_agent_and_never_restarts(kube, namespace, tmp_path):
    """A real `kubefly agent` (as the chart's agent ServiceAccount) runs both checks of a
    machine and writes the pod's readiness gate. The host's pod range is in 127/8, so the
    checks reach listeners this test opens on the pod's address."""
    import secrets
    import socket
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kubefly.devcluster import host_manifest
    from kubefly.machines.pod import CHECKS_GATE
    from kubefly.ports import free_port

    region = f"t{uuid.uuid4().hex[:6]}"
    host = f"host-{region}"
    node = host_manifest(host, {labels.NODE_REGION: region})
    node["spec"]["podCIDR"] = f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}.0/24"
    kube.cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
    kube.cluster.wait_hosts_ready([host])
    # The token of the chart's agent pod on that host: it names the host, and the
    # chart's admission policy lets the agent write only its own host's pod status.
    agent_pod = kube.wait_for(f"the chart's agent pod on {host}", lambda: kube.kubectl(
        "-n", kube.release_namespace, "get", "pods", "-l", "app.kubernetes.io/component=agent",
        "--field-selector", f"spec.nodeName={host}", "-o", "jsonpath={.items[*].metadata.name}", check=False).stdout.strip())
    agent_kubeconfig = kube.cluster.service_account_kubeconfig(kube.release_namespace, f"{kube.release}-agent",
                                                               tmp_path / "agent-kubeconfig", bind_pod=agent_pod)
    key = tmp_path / "gossip.key"
    key.write_text(secrets.token_urlsafe(32))
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [str(Path(sys.executable).with_name("kubefly")), "agent", "--host", host, "--region", region,
         "--gossip", f"127.0.0.1:{free_port()}", "--api", f"127.0.0.1:{free_port()}", "--key-file", str(key),
         "--source", "pods"],
        env={**os.environ, "KUBECONFIG": str(agent_kubeconfig)}, stdout=log, stderr=subprocess.STDOUT)
    tcp = http = None
    # Free ports, not 5432/8080: a wildcard listener of anything else on the box would take the pod's address too.
    tcp_port, http_port = free_port(), free_port()
    try:
        apply(kube, namespace, "checked", region=region,
              checks=[{"name": "tcp-db", "type": "tcp", "port": tcp_port, "intervalSeconds": 1},
                      {"name": "http-health", "type": "http", "port": http_port, "path": "/health", "intervalSeconds": 1}])
        m = wait_machine(kube, namespace, "checked", "started", state_is("started"))
        pod = get(kube, namespace, "pod", "checked")
        assert pod["spec"]["readinessGates"] == [{"conditionType": CHECKS_GATE}]
        assert "readinessProbe" not in pod["spec"]["containers"][0] and "livenessProbe" not in pod["spec"]["containers"][0]
        ip, uid = pod["status"]["podIP"], pod["metadata"]["uid"]
        assert ip.startswith("127.")

        # Nothing listens yet: the agent says both fail, and the machine gets no traffic.
        m = wait_machine(kube, namespace, "checked", "checks failing", lambda m: "tcp-db" in (cond(m, "Ready") or {}).get("message", ""))
        assert cond(m, "Ready")["reason"] == "ChecksFailing" and "http-health" in cond(m, "Ready")["message"]

        tcp = socket.create_server((ip, tcp_port))
        health = {"ok": True}

        class Health(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if health["ok"] and self.path == "/health" else 503)
                self.end_headers()

            def log_message(self, *_):
                pass

        http = ThreadingHTTPServer((ip, http_port), Health)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        wait_machine(kube, namespace, "checked", "Ready once every check passes", ready, timeout=30)

        # The second check alone fails: not Ready, still started, the pod untouched.
        health["ok"] = False
        m = wait_machine(kube, namespace, "checked", "the failing second check reported",
                         lambda m: (cond(m, "Ready") or {}).get("reason") == "ChecksFailing", timeout=30)
        assert "http-health" in cond(m, "Ready")["message"] and "tcp-db" not in cond(m, "Ready")["message"]
        assert m["status"]["state"] == "started" and m["status"]["version"] == 1
        pod = get(kube, namespace, "pod", "checked")
        assert pod["metadata"]["uid"] == uid and pod["status"]["containerStatuses"][0]["restartCount"] == 0
        health["ok"] = True
        wait_machine(kube, namespace, "checked", "Ready again", ready, timeout=30)
    finally:
        if http is not None:
            http.shutdown()
            http.server_close()
        if tcp is not None:
            tcp.close()
        agent.terminate()
        agent.wait(timeout=30)
        log.close()
        kube.kubectl("-n", namespace, "delete", "machine", "checked", "--wait=false", check=False)
        kube.kubectl("delete", "node", host, "--ignore-not-found", "--wait=false")
